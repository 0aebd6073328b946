//! Golden parity of `SanaTransformer2DModel`, the TrigFlow wrapper, the logvar head and the dual-number JVP
//! against fixtures written by the real diffusers code (tools/golden/make_golden.py: diffusers 0.42.1,
//! torch 2.15, CPU, float32): a 2-layer D=16 teacher (non-guidance) and student (guidance), JVP by
//! `torch.func.jvp`. Plus: the real 0.6B/1.6B checkpoint key lists and parameter counts, built through the same
//! constructor without allocating the weights.

use crate::common;
use crate::common::{assert_close, fixture_path, load_fixture, max_abs_diff};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel, SelfAttention};
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::nn::dual::{self, Dual};
use sana_sprint::rng::SeededRng;
use sana_sprint::synth;

/// Tolerance on the relative L2 error of every f32 output against PyTorch.
const REL_TOL: f64 = 1e-4;

/// The tiny model's weights (prefix "teacher." or "student.") and its io tensors (also read by golden_disc_loss).
pub(crate) struct Tiny {
    pub(crate) io: HashMap<String, Tensor>,
    pub(crate) teacher: HashMap<String, Tensor>,
    student: HashMap<String, Tensor>,
    pub(crate) config: SanaConfig,
}

pub(crate) fn tiny() -> Tiny {
    let all = load_fixture("sana_transformer_tiny");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("sana_transformer_tiny.json")).unwrap(),
    )
    .unwrap();
    let config: SanaConfig = serde_json::from_value(json["config"].clone()).unwrap();
    let part = |prefix: &str| -> HashMap<String, Tensor> {
        all.iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect()
    };
    Tiny {
        io: part("io."),
        teacher: part("teacher."),
        student: part("student."),
        config,
    }
}

impl Tiny {
    fn io(&self, name: &str) -> Tensor {
        self.io[name].clone()
    }

    fn model(&self, student: bool, dtype: DType) -> SanaTrigFlow {
        self.model_with(student, dtype, SelfAttention::Linear)
    }

    fn model_with(&self, student: bool, dtype: DType, attention: SelfAttention) -> SanaTrigFlow {
        let mut cfg = self.config.clone();
        cfg.guidance_embeds = student;
        let weights = if student {
            &self.student
        } else {
            &self.teacher
        };
        let vb = VarBuilder::from_tensors(weights.clone(), dtype, &Device::Cpu);
        let transformer = SanaTransformer2DModel::new(&cfg, vb.clone())
            .unwrap()
            .with_self_attention(attention);
        if student {
            SanaTrigFlow::with_logvar(transformer, &vb).unwrap()
        } else {
            SanaTrigFlow::new(transformer)
        }
    }

    fn mask(&self) -> Tensor {
        self.io("mask")
    }
}

#[test]
fn timestep_features_match_diffusers() {
    let io = load_fixture("timestep_features");
    let got = dual::timestep_features(&Dual::constant(io["io.t"].clone()), 256)
        .unwrap()
        .primal;
    let abs = max_abs_diff(&got, &io["io.features"]);
    println!("timestep features: max abs {abs:.3e}");
    assert!(abs < 1e-6, "timestep features: max abs error {abs:.3e}");
}

#[test]
fn teacher_and_student_velocity_match_diffusers() {
    let tiny = tiny();
    let (x, y, mask, tau, g) = (
        tiny.io("x"),
        tiny.io("y"),
        tiny.mask(),
        tiny.io("tau"),
        tiny.io("guidance"),
    );
    let teacher = tiny.model(false, DType::F32);
    let v = teacher
        .transformer()
        .forward(
            &Dual::constant(x.clone()),
            &y,
            &Dual::constant(tau.clone()),
            None,
            Some(&mask),
        )
        .unwrap();
    assert!(v.tangent.is_none());
    assert_close("teacher_v", &v.primal, &tiny.io("teacher_v"), REL_TOL);

    let student = tiny.model(true, DType::F32);
    let v = student
        .transformer()
        .forward(
            &Dual::constant(x),
            &y,
            &Dual::constant(tau),
            Some(&g),
            Some(&mask),
        )
        .unwrap();
    assert_close("student_v", &v.primal, &tiny.io("student_v"), REL_TOL);
}

#[test]
fn trigflow_outputs_and_logvar_match_diffusers() {
    let tiny = tiny();
    let (x, y, mask, t, g) = (
        tiny.io("x"),
        tiny.io("y"),
        tiny.mask(),
        tiny.io("t"),
        tiny.io("guidance"),
    );
    let teacher = tiny.model(false, DType::F32);
    let f = teacher
        .forward(
            &Dual::constant(x.clone()),
            &y,
            &Dual::constant(t.clone()),
            None,
            Some(&mask),
        )
        .unwrap();
    assert_close("teacher_F", &f.primal, &tiny.io("teacher_F"), REL_TOL);

    let student = tiny.model(true, DType::F32);
    let f = student
        .forward(
            &Dual::constant(x),
            &y,
            &Dual::constant(t.clone()),
            Some(&g),
            Some(&mask),
        )
        .unwrap();
    assert_close("student_F", &f.primal, &tiny.io("student_F"), REL_TOL);
    let logvar = student.logvar(&t, Some(&g)).unwrap();
    assert_close(
        "student_logvar",
        &logvar,
        &tiny.io("student_logvar"),
        REL_TOL,
    );
}

/// The working dtype may be bf16 (norms, softmax, attention sums and wrapper maths stay f32): loose tolerances.
/// Tangents take the primal's dtype, so a bf16 JVP is coarse (docs/ALGORITHM.md §8 runs the JVP in f32).
#[test]
fn bf16_student_stays_close_to_the_f32_reference() {
    let tiny = tiny();
    let out = student_jvp(&tiny, DType::BF16, SelfAttention::Linear);
    assert_eq!(out.dtype(), DType::F32, "the wrapper returns f32");
    assert_close(
        "student_F (bf16 weights)",
        &out.primal,
        &tiny.io("student_F_jvp_primal"),
        3e-2,
    );
    assert_close(
        "student_dF (bf16 weights)",
        out.tangent.as_ref().unwrap(),
        &tiny.io("student_dF"),
        5e-2,
    );
}

/// The student's F and dF = JVP along (jvp_vx, jvp_vt) with the given self-attention.
fn student_jvp(tiny: &Tiny, dtype: DType, attention: SelfAttention) -> Dual {
    let student = tiny.model_with(true, dtype, attention);
    let cast = |t: Tensor| t.to_dtype(dtype).unwrap();
    let x = Dual::with_tangent(cast(tiny.io("x")), cast(tiny.io("jvp_vx")));
    let t = Dual::with_tangent(cast(tiny.io("t")), cast(tiny.io("jvp_vt")));
    student
        .forward(
            &x,
            &tiny.io("y"),
            &t,
            Some(&tiny.io("guidance")),
            Some(&tiny.mask()),
        )
        .unwrap()
}

#[test]
fn student_jvp_matches_torch_func_jvp() {
    let tiny = tiny();
    let out = student_jvp(&tiny, DType::F32, SelfAttention::Linear);
    assert_close(
        "student F (jvp primal)",
        &out.primal,
        &tiny.io("student_F_jvp_primal"),
        REL_TOL,
    );
    assert_close(
        "student_dF",
        out.tangent.as_ref().unwrap(),
        &tiny.io("student_dF"),
        REL_TOL,
    );
}

#[test]
fn softmax_self_attention_variant_matches_the_reference_script() {
    let tiny = tiny();
    let out = student_jvp(&tiny, DType::F32, SelfAttention::Softmax);
    assert_close(
        "student_softmax_self_attn_F",
        &out.primal,
        &tiny.io("student_softmax_self_attn_F"),
        REL_TOL,
    );
    assert_close(
        "student_softmax_self_attn_dF",
        out.tangent.as_ref().unwrap(),
        &tiny.io("student_softmax_self_attn_dF"),
        REL_TOL,
    );
}

/// Cross-check only: central differences of the f64 wrapper along (jvp_vx, jvp_vt) against the dual JVP.
#[test]
fn student_jvp_agrees_with_central_differences_in_f64() {
    let tiny = tiny();
    let student = tiny.model(true, DType::F64);
    let (x, vx) = (
        tiny.io("x").to_dtype(DType::F64).unwrap(),
        tiny.io("jvp_vx").to_dtype(DType::F64).unwrap(),
    );
    let (t, vt) = (
        tiny.io("t").to_dtype(DType::F64).unwrap(),
        tiny.io("jvp_vt").to_dtype(DType::F64).unwrap(),
    );
    let (y, g, mask) = (tiny.io("y"), tiny.io("guidance"), tiny.mask());
    let eval = |h: f64| {
        let xs = (&x + vx.affine(h, 0.).unwrap()).unwrap();
        let ts = (&t + vt.affine(h, 0.).unwrap()).unwrap();
        student
            .forward(
                &Dual::constant(xs),
                &y,
                &Dual::constant(ts),
                Some(&g),
                Some(&mask),
            )
            .unwrap()
            .primal
    };
    let h = 1e-5;
    let fd = ((eval(h) - eval(-h)).unwrap() / (2.0 * h)).unwrap();
    let exact = student
        .forward(
            &Dual::with_tangent(x.clone(), vx.clone()),
            &y,
            &Dual::with_tangent(t.clone(), vt.clone()),
            Some(&g),
            Some(&mask),
        )
        .unwrap();
    assert_close(
        "dual JVP (f64) vs central differences (f64, h=1e-5)",
        exact.tangent.as_ref().unwrap(),
        &fd,
        1e-7,
    );
    let f32_jvp = student_jvp(&tiny, DType::F32, SelfAttention::Linear);
    assert_close(
        "dual JVP (f32) vs central differences (f64)",
        f32_jvp.tangent.as_ref().unwrap(),
        &fd,
        REL_TOL,
    );
}

#[test]
fn block_taps_are_the_block_outputs() {
    let tiny = tiny();
    let (x, y, mask, t) = (tiny.io("x"), tiny.io("y"), tiny.mask(), tiny.io("t"));
    let teacher = tiny.model(false, DType::F32);
    let model = teacher.transformer();
    let tau = Dual::constant(tiny.io("tau"));
    let (out, taps) = model
        .forward_with_taps(
            &Dual::constant(x.clone()),
            &y,
            &tau,
            None,
            Some(&mask),
            &[1, 0],
        )
        .unwrap();
    assert_close(
        "forward_with_taps output",
        &out.primal,
        &tiny.io("teacher_v"),
        REL_TOL,
    );
    let early = model
        .block_outputs(
            &Dual::constant(x.clone()),
            &y,
            &tau,
            None,
            Some(&mask),
            &[0],
        )
        .unwrap();
    assert_eq!(taps.len(), 2);
    assert_eq!(taps[0].dims(), &[2, 16, 16]);
    assert_eq!(
        max_abs_diff(&early[0].primal, &taps[1].primal),
        0.0,
        "early stop must not change block 0's output"
    );
    assert!(
        max_abs_diff(&taps[0].primal, &taps[1].primal) > 1e-3,
        "taps must be in the order asked for"
    );
    let wrapped = teacher
        .block_outputs(&x, &y, &t, None, Some(&mask), &[1])
        .unwrap();
    assert_eq!(wrapped[0].dims(), &[2, 16, 16]);
    assert!(model
        .block_outputs(&Dual::constant(x), &y, &tau, None, Some(&mask), &[2])
        .is_err());
}

/// Training runs reverse mode through the same layers: with `Var` weights every parameter gets a gradient, the
/// gradient agrees with central differences (f64), and `Var::set` reaches the model (its weights are views).
#[test]
fn student_backward_through_the_same_code_matches_central_differences() {
    let tiny = tiny();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    for (name, value) in &tiny.student {
        let var = Var::from_tensor(&value.to_dtype(DType::F64).unwrap()).unwrap();
        varmap.data().lock().unwrap().insert(name.clone(), var);
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mut cfg = tiny.config.clone();
    cfg.guidance_embeds = true;
    let student =
        SanaTrigFlow::with_logvar(SanaTransformer2DModel::new(&cfg, vb.clone()).unwrap(), &vb)
            .unwrap();
    let (x, t) = (
        tiny.io("x").to_dtype(DType::F64).unwrap(),
        tiny.io("t").to_dtype(DType::F64).unwrap(),
    );
    let (y, g, mask) = (tiny.io("y"), tiny.io("guidance"), tiny.mask());
    let loss = || {
        let f = student
            .forward(
                &Dual::constant(x.clone()),
                &y,
                &Dual::constant(t.clone()),
                Some(&g),
                Some(&mask),
            )
            .unwrap();
        let logvar = student
            .logvar(&t, Some(&g))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        (f.primal.sqr().unwrap().sum_all().unwrap() + logvar.sum_all().unwrap()).unwrap()
    };
    let grads = loss().backward().unwrap();
    let vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut slope = 0.0;
    let mut directions = Vec::new();
    for (name, var) in &vars {
        let grad = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        // a seeded direction per parameter (candle's CPU generator cannot be seeded: the test would vary)
        let dir = SeededRng::for_name(7, name)
            .normal_tensor(var.shape().clone(), 0.0, 1.0, var.device())
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        slope += (grad * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        directions.push((var.clone(), var.as_tensor().copy().unwrap(), dir));
    }
    let h = 1e-6;
    let shifted = |sign: f64| {
        for (var, original, dir) in &directions {
            var.set(&(original + dir.affine(sign * h, 0.0).unwrap()).unwrap())
                .unwrap();
        }
        loss().to_scalar::<f64>().unwrap()
    };
    let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * h);
    let rel = ((slope - fd) / fd).abs();
    println!("backward: directional derivative {slope:.9e} vs central differences {fd:.9e} (rel {rel:.2e})");
    assert!(
        rel < 1e-6,
        "gradient disagrees with central differences: {slope} vs {fd}"
    );
}

/// Parameter names with their shapes.
type KeyShapes = Vec<(String, Vec<usize>)>;

struct Recorded {
    transformer: KeyShapes,
    with_logvar: KeyShapes,
}

/// The keys the transformer alone and the TrigFlow wrapper with its logvar head request, built without
/// allocating the weights.
fn record(cfg: &SanaConfig) -> Recorded {
    let transformer =
        synth::record_keys(|vb| Ok(SanaTransformer2DModel::new(cfg, vb).map(|_| ())?)).unwrap();
    let with_logvar = synth::record_keys(|vb| {
        let transformer = SanaTransformer2DModel::new(cfg, vb.clone())?;
        let wrapper = SanaTrigFlow::with_logvar(transformer, &vb)?;
        assert!(wrapper.has_logvar());
        Ok(())
    })
    .unwrap();
    Recorded {
        transformer,
        with_logvar,
    }
}

fn reference_keys(file: &str) -> KeyShapes {
    common::reference_keys(file).into_iter().collect()
}

fn sorted(mut v: KeyShapes) -> KeyShapes {
    v.sort();
    v
}

fn param_count(keys: &[(String, Vec<usize>)]) -> usize {
    keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

fn real_config(size: &str, guidance: bool) -> SanaConfig {
    // the diffusers config.json of the Sprint checkpoints (docs/ALGORITHM.md §2.1); unlisted fields take the defaults
    let (heads, layers, cross_heads, cross_head_dim) = match size {
        "1.6B" => (70, 20, 20, 112),
        "0.6B" => (36, 28, 16, 72),
        _ => unreachable!(),
    };
    let json = serde_json::json!({
        "_class_name": "SanaTransformer2DModel",
        "in_channels": 32, "out_channels": 32,
        "num_attention_heads": heads, "attention_head_dim": 32, "num_layers": layers,
        "num_cross_attention_heads": cross_heads, "cross_attention_head_dim": cross_head_dim,
        "cross_attention_dim": heads * 32, "caption_channels": 2304, "mlp_ratio": 2.5,
        "attention_bias": false, "sample_size": 32, "patch_size": 1, "norm_elementwise_affine": false,
        "norm_eps": 1e-6, "interpolation_scale": null, "qk_norm": "rms_norm_across_heads",
        "guidance_embeds": guidance, "guidance_embeds_scale": 0.1, "timestep_scale": 1.0
    });
    serde_json::from_value(json).unwrap()
}

#[test]
fn real_checkpoint_keys_shapes_and_parameter_counts() {
    let expected_counts = [
        ("1.6B", false, 1_604_641_952usize),
        ("1.6B", true, 1_610_237_472),
        ("0.6B", false, 591_876_896),
        ("0.6B", true, 593_501_216),
    ];
    for (size, guidance, count) in expected_counts {
        let cfg = real_config(size, guidance);
        let rec = record(&cfg);
        let role = if guidance { "student" } else { "teacher" };
        let reference = reference_keys(&format!("sana_sprint_{size}_{role}_transformer.txt"));
        let built = if guidance {
            rec.with_logvar.clone()
        } else {
            rec.transformer.clone()
        };
        assert_eq!(
            sorted(built),
            sorted(reference.clone()),
            "{size} {role}: keys/shapes differ from the checkpoint"
        );
        assert_eq!(
            param_count(&rec.transformer),
            count,
            "{size} {role}: parameter count"
        );
        let dim = cfg.inner_dim();
        assert_eq!(
            param_count(&rec.with_logvar),
            count + dim + 1,
            "{size} {role}: logvar head adds D + 1"
        );
        println!(
            "{size} {role}: {} keys, {} parameters (+{} logvar)",
            reference.len(),
            count,
            dim + 1
        );
    }
}

#[test]
fn config_defaults_are_diffusers_defaults() {
    let cfg: SanaConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, SanaConfig::default());
    assert_eq!(
        (cfg.inner_dim(), cfg.ff_hidden(), cfg.out_channels()),
        (2240, 5600, 32)
    );
    let bad: SanaConfig = serde_json::from_str(r#"{"interpolation_scale": 1.0}"#).unwrap();
    assert!(bad.validate().is_err());
}
