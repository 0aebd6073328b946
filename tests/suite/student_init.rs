//! Student initialisation from the teacher (docs/ALGORITHM.md §5.2, ALGORITHM.md §9 #2, #3): every student tensor is either copied
//! from the teacher (bit-equal after the f32 conversion) or initialised as specified; the student starts as the
//! teacher (checked against the torch teacher's output of tests/fixtures/sana_transformer_tiny, f32, relative
//! L2 < 1e-4); only the learnable guidance init lets training make the output depend on the guidance scale.

use crate::common;
use crate::common::{fixture_path, max_abs_diff, rel_l2};

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use sana_sprint::models::sana::{SanaConfig, SelfAttention};
use sana_sprint::models::student::{GuidanceInit, Student, GUIDANCE_INIT_STD};
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::models::weights::Weights;
use sana_sprint::nn::dual::Dual;

const GUIDANCE_PREFIX: &str = "time_embed.guidance_embedder.";

fn tiny_teacher_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint/transformer")
}

fn fixture() -> HashMap<String, Tensor> {
    common::load_fixture("sana_transformer_tiny")
}

fn fixture_config() -> SanaConfig {
    common::fixture_config("sana_transformer_tiny")
}

/// The fixture's `teacher.*` weights, also reachable under their own names.
fn fixture_teacher() -> Weights {
    Weights::from_files(&[fixture_path("sana_transformer_tiny.safetensors")])
        .unwrap()
        .strip_prefix("teacher.")
}

/// The names of the fixture's teacher tensors.
fn fixture_teacher_keys() -> BTreeSet<String> {
    fixture()
        .keys()
        .filter_map(|k| k.strip_prefix("teacher.").map(String::from))
        .collect()
}

/// The student initialised from the fixture's `teacher.*` weights.
fn fixture_student(guidance: GuidanceInit) -> Student {
    Student::from_teacher_weights(
        &fixture_config(),
        fixture_teacher(),
        guidance,
        7,
        &Device::Cpu,
    )
    .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The teacher key a copied student tensor comes from, or `None` for freshly initialised ones.
fn teacher_source(name: &str) -> Option<String> {
    if name.starts_with(GUIDANCE_PREFIX) || name.starts_with("logvar_linear.") {
        None
    } else if let Some(rest) = name.strip_prefix("time_embed.timestep_embedder.") {
        Some(format!("time_embed.emb.timestep_embedder.{rest}"))
    } else {
        Some(name.to_string())
    }
}

/// Checks every student tensor against its teacher source (bit-equal after `to_dtype(F32)`) or its
/// initialisation rule; returns the number of copied tensors.
fn check_initialisation(
    student: &Student,
    teacher: &Weights,
    teacher_keys: &BTreeSet<String>,
    guidance: GuidanceInit,
) -> usize {
    let dim = student.config().inner_dim();
    let mut copied = BTreeSet::new();
    for (name, var) in student.named_vars() {
        assert_eq!(var.dtype(), DType::F32, "{name}: master weights are f32");
        let value = var.as_tensor();
        match teacher_source(&name) {
            Some(key) => {
                let want = teacher.load(&key, DType::F32, &Device::Cpu).unwrap();
                assert_eq!(
                    values(value),
                    values(&want),
                    "{name} is not a copy of {key}"
                );
                copied.insert(key);
            }
            None if name == "time_embed.guidance_embedder.linear_1.weight"
                && guidance == GuidanceInit::Learnable =>
            {
                assert_eq!(value.dims(), &[dim, 256]);
                let (mean, std) = mean_std(&values(value));
                println!("{name}: mean {mean:.2e}, std {std:.5} (want 0, {GUIDANCE_INIT_STD})");
                assert!(mean.abs() < 2e-3, "{name}: mean {mean}");
                assert!(
                    (std / GUIDANCE_INIT_STD - 1.0).abs() < 0.05,
                    "{name}: std {std}"
                );
            }
            None if name == "logvar_linear.weight" => {
                let bound = (6.0 / (dim + 1) as f64).sqrt();
                let largest = common::max_abs(value);
                assert!(
                    largest <= bound && largest > bound / 2.0,
                    "{name}: max |w| {largest} for Xavier bound {bound}"
                );
            }
            None => assert_eq!(common::max_abs(value), 0.0, "{name} must start at zero"),
        }
    }
    assert_eq!(
        &copied, teacher_keys,
        "every teacher tensor is used exactly once"
    );
    copied.len()
}

/// Checks the counts of a student built from `teacher`: its tensors, 4 guidance-embedder tensors and the 2 of
/// the logvar head.
fn check_counts(
    student: &Student,
    teacher: &Weights,
    teacher_keys: &BTreeSet<String>,
    copied: usize,
) {
    assert!(student.config().guidance_embeds);
    assert_eq!(student.self_attention(), SelfAttention::Linear);
    assert_eq!(student.named_vars().len(), copied + 4 + 2);
    let dim = student.config().inner_dim();
    let teacher_params: usize = teacher_keys
        .iter()
        .map(|k| teacher.shape(k).unwrap().iter().product::<usize>())
        .sum();
    assert_eq!(
        student.parameter_count(),
        teacher_params + (256 * dim + dim + dim * dim + dim) + dim + 1
    );
}

#[test]
fn every_student_tensor_is_a_teacher_copy_or_initialised_as_specified() {
    // the demo pipeline's 20-block teacher folder
    let dir = tiny_teacher_dir();
    let teacher = Weights::from_folder(&dir, &["diffusion_pytorch_model"]).unwrap();
    let student = Student::from_teacher(&dir, GuidanceInit::Learnable, 1, &Device::Cpu).unwrap();
    let keys: BTreeSet<String> = teacher.keys().map(String::from).collect();
    let copied = check_initialisation(&student, &teacher, &keys, GuidanceInit::Learnable);
    check_counts(&student, &teacher, &keys, copied);
    println!(
        "tiny-sana-sprint teacher: {copied} tensors copied, {} parameters",
        student.parameter_count()
    );
    // the golden fixture's teacher, both guidance inits
    for guidance in [GuidanceInit::Learnable, GuidanceInit::Zero] {
        let (teacher, keys) = (fixture_teacher(), fixture_teacher_keys());
        let student = fixture_student(guidance);
        let copied = check_initialisation(&student, &teacher, &keys, guidance);
        check_counts(&student, &teacher, &keys, copied);
    }
}

#[test]
fn the_same_seed_gives_the_same_student_and_another_seed_another_one() {
    let fresh = |seed| {
        let student = Student::from_teacher_weights(
            &fixture_config(),
            fixture_teacher(),
            GuidanceInit::Learnable,
            seed,
            &Device::Cpu,
        )
        .unwrap();
        let vars: HashMap<String, Var> = student.named_vars().into_iter().collect();
        [
            "time_embed.guidance_embedder.linear_1.weight",
            "logvar_linear.weight",
        ]
        .map(|name| values(vars[name].as_tensor()))
    };
    assert_eq!(fresh(3), fresh(3));
    let (a, b) = (fresh(3), fresh(4));
    assert_ne!(a[0], b[0]);
    assert_ne!(a[1], b[1]);
}

#[test]
fn a_bf16_teacher_gives_f32_master_weights() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let teacher: HashMap<String, Tensor> = fx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("teacher.")
                .map(|k| (k.to_string(), v.to_dtype(DType::BF16).unwrap()))
        })
        .collect();
    candle_core::safetensors::save(
        &teacher,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        fixture_config_json().to_string(),
    )
    .unwrap();

    let student =
        Student::from_teacher(dir.path(), GuidanceInit::Learnable, 0, &Device::Cpu).unwrap();
    let stored = Weights::from_folder(dir.path(), &["diffusion_pytorch_model"]).unwrap();
    let keys: BTreeSet<String> = stored.keys().map(String::from).collect();
    check_initialisation(&student, &stored, &keys, GuidanceInit::Learnable);
}

fn fixture_config_json() -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("sana_transformer_tiny.json")).unwrap(),
    )
    .unwrap();
    json["config"].clone()
}

#[test]
fn teacher_checkpoint_problems_are_reported() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let write = |dir: &Path, guidance: bool, drop: &str| {
        let teacher: HashMap<String, Tensor> = fx
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("teacher.")
                    .map(|k| (k.to_string(), v.clone()))
            })
            .filter(|(k, _)| k != drop)
            .collect();
        candle_core::safetensors::save(&teacher, dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
        let mut config = fixture_config_json();
        config["guidance_embeds"] = guidance.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    };
    write(dir.path(), true, "");
    let err = Student::from_teacher(dir.path(), GuidanceInit::Learnable, 0, &Device::Cpu)
        .err()
        .expect("a guidance checkpoint is not a teacher")
        .to_string();
    assert!(err.contains("guidance_embeds"), "{err}");

    let missing = "transformer_blocks.1.attn2.to_k.bias";
    write(dir.path(), false, missing);
    let err = Student::from_teacher(dir.path(), GuidanceInit::Learnable, 0, &Device::Cpu)
        .err()
        .expect("a missing tensor is an error")
        .to_string();
    assert!(err.contains(missing), "{err}");
}

/// F of the TrigFlow model on the fixture inputs with the given guidance.
fn trigflow_output(model: &SanaTrigFlow, guidance: &Tensor) -> Tensor {
    let fx = fixture();
    model
        .forward(
            &Dual::constant(fx["io.x"].clone()),
            &fx["io.y"],
            &Dual::constant(fx["io.t"].clone()),
            Some(guidance),
            Some(&fx["io.mask"]),
        )
        .unwrap()
        .primal
}

#[test]
fn the_student_starts_as_the_teacher_for_any_guidance() {
    let fx = fixture();
    let want = &fx["io.teacher_F"];
    for guidance in [GuidanceInit::Learnable, GuidanceInit::Zero] {
        let student = fixture_student(guidance);
        let low = Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
        let high = Tensor::new(&[0.9f32, 0.6], &Device::Cpu).unwrap();
        let f = trigflow_output(&student.model, &low);
        let rel = rel_l2(&f, want);
        println!("{guidance:?}: student F at init vs torch teacher F: rel L2 {rel:.3e}");
        assert!(rel < 1e-4, "{guidance:?}: rel L2 {rel:.3e}");
        assert_eq!(
            max_abs_diff(&f, &trigflow_output(&student.model, &high)),
            0.0,
            "the guidance embedding is exactly zero at init"
        );
    }
}

/// One SGD step on `sum(F ⊙ R)`; returns the guidance embedder's gradients by name (zeros where absent).
fn sgd_step(student: &Student, lr: f64) -> HashMap<String, Tensor> {
    let fx = fixture();
    let f = trigflow_output(&student.model, &fx["io.guidance"]);
    let grads = (f * &fx["io.jvp_vx"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut guidance_grads = HashMap::new();
    for (name, var) in student.named_vars() {
        let grad = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.zeros_like().unwrap(),
        };
        var.set(&(var.as_tensor() - grad.affine(lr, 0.0).unwrap()).unwrap())
            .unwrap();
        if let Some(short) = name.strip_prefix(GUIDANCE_PREFIX) {
            guidance_grads.insert(short.to_string(), grad);
        }
    }
    guidance_grads
}

#[test]
fn only_the_learnable_guidance_init_can_learn_to_use_the_guidance_scale() {
    let low = Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
    let high = Tensor::new(&[0.9f32, 0.6], &Device::Cpu).unwrap();

    let zero = fixture_student(GuidanceInit::Zero);
    let grads = sgd_step(&zero, 0.1);
    for name in ["linear_1.weight", "linear_1.bias", "linear_2.weight"] {
        assert_eq!(
            common::max_abs(&grads[name]),
            0.0,
            "zero init: {name} gets no gradient"
        );
    }
    assert!(
        common::max_abs(&grads["linear_2.bias"]) > 1e-3,
        "zero init: linear_2.bias learns"
    );
    let moved = max_abs_diff(
        &trigflow_output(&zero.model, &low),
        &trigflow_output(&zero.model, &high),
    );
    assert_eq!(
        moved, 0.0,
        "zero init: the output stays independent of the guidance scale"
    );

    let learnable = fixture_student(GuidanceInit::Learnable);
    let grads = sgd_step(&learnable, 0.1);
    assert!(
        common::max_abs(&grads["linear_2.weight"]) > 1e-3,
        "learnable init: linear_2.weight learns"
    );
    let moved = max_abs_diff(
        &trigflow_output(&learnable.model, &low),
        &trigflow_output(&learnable.model, &high),
    );
    println!("after one step: output change between guidance scales {moved:.3e}");
    assert!(
        moved > 1e-4,
        "learnable init: the output depends on the guidance scale"
    );
}

#[test]
fn detached_copies_share_storage_and_build_no_graph() {
    let student = fixture_student(GuidanceInit::Learnable);
    let fx = fixture();
    let frozen = student.detached().unwrap();
    let g = &fx["io.guidance"];
    assert_eq!(
        max_abs_diff(
            &trigflow_output(&frozen, g),
            &trigflow_output(&student.model, g)
        ),
        0.0
    );
    let grads = trigflow_output(&frozen, g)
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in student.named_vars() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name} got a gradient through the detached copy"
        );
    }
    let t = &fx["io.t"];
    let before = frozen.logvar(t, Some(g)).unwrap();
    let vars: HashMap<String, Var> = student.named_vars().into_iter().collect();
    let bias = &vars["logvar_linear.bias"];
    bias.set(&(bias.as_tensor() + 1.5).unwrap()).unwrap();
    let after = frozen.logvar(t, Some(g)).unwrap();
    let shift = (after - before).unwrap();
    assert!(
        (common::max_abs(&(shift - 1.5).unwrap())) < 1e-6,
        "the detached copy sees Var::set"
    );
}

#[test]
fn saved_students_reload_and_select_their_self_attention() {
    let student = fixture_student(GuidanceInit::Learnable);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("student.safetensors");
    student.varmap.save(&path).unwrap();
    let reloaded = Student::from_weights(
        student.config(),
        Weights::from_files(&[path]).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let originals: HashMap<String, Var> = student.named_vars().into_iter().collect();
    assert_eq!(reloaded.named_vars().len(), originals.len());
    for (name, var) in reloaded.named_vars() {
        assert_eq!(
            values(var.as_tensor()),
            values(originals[&name].as_tensor()),
            "{name}"
        );
    }

    let g = &fixture()["io.guidance"];
    let softmax = reloaded
        .with_self_attention(SelfAttention::Softmax)
        .unwrap();
    assert_eq!(softmax.self_attention(), SelfAttention::Softmax);
    let diff = max_abs_diff(
        &trigflow_output(&softmax.model, g),
        &trigflow_output(&student.model, g),
    );
    assert!(diff > 1e-3, "softmax self-attention changes the output");
    let diff_detached = max_abs_diff(
        &trigflow_output(&softmax.detached().unwrap(), g),
        &trigflow_output(&softmax.model, g),
    );
    assert_eq!(
        diff_detached, 0.0,
        "detached copies keep the self-attention"
    );
}
