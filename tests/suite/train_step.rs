//! Parity of one generator step and one discriminator step with a PyTorch statement of the reference maths
//! with the recommended fixes (tools/golden/make_golden_step.py → tests/fixtures/train_step_tiny.*), every
//! random draw injected: losses, intermediate tensors, pre-clip gradients and norms, and the parameters after
//! the clipped AdamW update. f32; relative L2 error ≤ 1e-4 per tensor and relative error ≤ 1e-4 per scalar.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sana_sprint::models::discriminator::DiscHeads;
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel};
use sana_sprint::models::student::Student;
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::models::weights::Weights;
use sana_sprint::train::loss::TimestepSampler;
use sana_sprint::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use sana_sprint::train::step::{
    self, Batch, DiscriminatorDraws, GeneratorDraws, LargestTimestepDraws, Models, StepSettings,
};

const TOL: f64 = 1e-4;

struct Fixture {
    t: HashMap<String, Tensor>,
    cfg: serde_json::Value,
    path: PathBuf,
}

impl Fixture {
    fn load() -> Self {
        let path = common::fixture_path("train_step_tiny.safetensors");
        let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(common::fixture_path("train_step_tiny.json")).unwrap(),
        )
        .unwrap();
        Self { t, cfg, path }
    }

    fn get(&self, name: &str) -> Tensor {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("fixture lacks {name}"))
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn f(&self, key: &str) -> f64 {
        self.cfg[key]
            .as_f64()
            .unwrap_or_else(|| panic!("fixture json lacks {key}"))
    }

    fn settings(&self) -> StepSettings {
        let sampler = |key: &str| TimestepSampler {
            mean: self.cfg[key]["mean"].as_f64().unwrap(),
            std: self.cfg[key]["std"].as_f64().unwrap(),
        };
        StepSettings {
            sigma_data: self.f("sigma_data"),
            scm_lambda: self.f("scm_lambda"),
            adv_lambda: self.f("adv_lambda"),
            tangent_warmup_steps: self.f("tangent_warmup_steps") as u64,
            guidance_embeds_scale: self.f("guidance_embeds_scale"),
            student_sampler: sampler("student_sampler"),
            disc_sampler: sampler("disc_sampler"),
            scm_cfg_scale: vec![4.0, 4.5, 5.0],
            train_largest_timestep: true,
            largest_timestep: self.f("largest_timestep"),
            largest_timestep_prob: self.f("largest_timestep_prob"),
            misaligned_pairs_d: true,
        }
    }

    fn adam(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.cfg["betas"][0].as_f64().unwrap(),
            beta2: self.cfg["betas"][1].as_f64().unwrap(),
            eps: self.f("eps"),
            weight_decay: self.f("weight_decay"),
        }
    }

    fn batch(&self) -> Batch {
        Batch {
            x0: self.get("batch.x0"),
            prompt_embeds: self.get("batch.prompt_embeds"),
            prompt_mask: self.get("batch.prompt_mask"),
            neg_embeds: self.get("batch.neg_embeds"),
            neg_mask: self.get("batch.neg_mask"),
        }
    }

    fn head_ids(&self) -> Vec<usize> {
        self.cfg["head_block_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }

    fn teacher(&self) -> SanaTrigFlow {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint/transformer");
        SanaTrigFlow::new(SanaTransformer2DModel::load(&dir, DType::F32, &Device::Cpu).unwrap())
    }

    fn student(&self) -> Student {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint/transformer");
        let config = SanaConfig::from_folder(&dir).unwrap();
        let weights = Weights::from_files(std::slice::from_ref(&self.path))
            .unwrap()
            .strip_prefix("student.");
        Student::from_weights(&config, weights, &Device::Cpu).unwrap()
    }

    fn heads(&self) -> DiscHeads {
        let weights = Weights::from_files(std::slice::from_ref(&self.path))
            .unwrap()
            .strip_prefix("heads.");
        let channels = 32;
        DiscHeads::load(
            &weights.var_builder(DType::F32, &Device::Cpu),
            &self.head_ids(),
            channels,
        )
        .unwrap()
    }
}

/// ‖a − b‖₂ / ‖b‖₂ (absolute when b is 0).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

fn check(name: &str, ours: &Tensor, want: &Tensor, worst: &mut (f64, String)) {
    let ours = if ours.dims() != want.dims() && ours.elem_count() == want.elem_count() {
        ours.reshape(want.dims()).unwrap()
    } else {
        ours.clone()
    };
    let e = rel(&ours, want);
    assert!(e <= TOL, "{name}: relative error {e:.3e} > {TOL:e}");
    if e > worst.0 {
        *worst = (e, name.to_string());
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .get(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn check_scalar(name: &str, ours: f64, want: f64) {
    let e = (ours - want).abs() / want.abs().max(1e-12);
    assert!(
        e <= TOL,
        "{name}: ours {ours} vs reference {want} (rel {e:.3e})"
    );
    println!("{name}: ours {ours:.8} reference {want:.8} rel {e:.2e}");
}

#[test]
fn generator_step_matches_reference() {
    let fx = Fixture::load();
    let s = fx.settings();
    let teacher = fx.teacher();
    let student = fx.student();
    let heads = fx.heads();
    let frozen = student.detached().unwrap();
    let models = Models {
        teacher: &teacher,
        student: &student.model,
        student_frozen: &frozen,
        heads: &heads,
        gradient_checkpointing: false,
        teacher_negative: None,
    };
    let draws = GeneratorDraws {
        noise: fx.get("g.noise"),
        t_normal: fx.get("g.t_normal"),
        cfg: fx.get("g.cfg"),
        largest: Some(LargestTimestepDraws {
            t_normal: Some(fx.get("g.t_prime_normal")),
            uniform: fx.get("g.largest_uniform"),
            noise: fx.get("g.noise_prime"),
        }),
        t_d_normal: fx.get("g.t_d_normal"),
        noise_d: fx.get("g.noise_d"),
    };
    let global_step = fx.f("global_step") as u64;
    let batch = fx.batch();
    let mut worst = (0.0, String::new());
    for checkpointing in [true, false] {
        let models = Models {
            gradient_checkpointing: checkpointing,
            ..models_ref(&models)
        };
        let out = step::generator_loss(&models, &batch, &draws, &s, global_step).unwrap();
        check("t", &out.t, &fx.get("g.out.t"), &mut worst);
        check("dxt_dt", &out.dxt_dt, &fx.get("g.out.dxt_dt"), &mut worst);
        check("dF", &out.df, &fx.get("g.out.dF"), &mut worst);
        check("F", &out.f, &fx.get("g.out.F"), &mut worst);
        check("logvar", &out.logvar, &fx.get("g.out.logvar"), &mut worst);
        check(
            "x0_pred",
            &out.x0_pred,
            &fx.get("g.out.x0_pred"),
            &mut worst,
        );
        check("logits", &out.logits, &fx.get("g.out.logits"), &mut worst);
        check_scalar("scm_loss", out.scm_loss, scalar(&fx.get("g.out.scm_loss")));
        check_scalar("adv_loss", out.adv_loss, scalar(&fx.get("g.out.adv_loss")));
        check_scalar("loss", scalar(&out.loss), scalar(&fx.get("g.out.loss")));

        let mut grads = out.loss.backward().unwrap();
        out.pending.finish(&mut grads).unwrap();
        let named = student.named_vars();
        let mut student_grads = GradStore::default();
        for (name, var) in &named {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            check(
                &format!("grad {name} (checkpointing {checkpointing})"),
                g,
                &fx.get(&format!("g.out.grad.{name}")),
                &mut worst,
            );
            student_grads.insert(var.as_tensor(), g.clone());
        }
        if !checkpointing {
            let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
            let norm = clip_grad_norm(&mut student_grads, &vars, fx.f("gradient_clip")).unwrap();
            check_scalar("G grad norm", norm, scalar(&fx.get("g.out.grad_norm")));
            let mut opt = AdamW::new(named.clone(), fx.adam()).unwrap();
            opt.step(&student_grads, fx.f("lr")).unwrap();
            for (name, var) in &named {
                check(
                    &format!("updated {name}"),
                    var.as_tensor(),
                    &fx.get(&format!("g.out.student.{name}")),
                    &mut worst,
                );
            }
        }
    }
    println!("worst relative error {:.3e} ({})", worst.0, worst.1);
}

/// A copy of the model references (Models holds only references).
fn models_ref<'a>(m: &Models<'a>) -> Models<'a> {
    Models {
        teacher: m.teacher,
        student: m.student,
        student_frozen: m.student_frozen,
        heads: m.heads,
        gradient_checkpointing: m.gradient_checkpointing,
        teacher_negative: m.teacher_negative,
    }
}

#[test]
fn discriminator_step_matches_reference() {
    let fx = Fixture::load();
    let s = fx.settings();
    let teacher = fx.teacher();
    let student = fx.student();
    let heads = fx.heads();
    let frozen = student.detached().unwrap();
    let models = Models {
        teacher: &teacher,
        student: &student.model,
        student_frozen: &frozen,
        heads: &heads,
        gradient_checkpointing: false,
        teacher_negative: None,
    };
    let draws = DiscriminatorDraws {
        noise: fx.get("d.noise"),
        t_normal: fx.get("d.t_normal"),
        cfg: fx.get("d.cfg"),
        largest: Some(LargestTimestepDraws {
            t_normal: None,
            uniform: fx.get("d.largest_uniform"),
            noise: fx.get("d.noise_largest"),
        }),
        t_d_normal: fx.get("d.t_d_normal"),
        noise_fake: fx.get("d.noise_fake"),
        noise_real: fx.get("d.noise_real"),
        shift: Some((fx.get("d.t_shift_normal"), fx.get("d.noise_shift"))),
    };
    let mut worst = (0.0, String::new());
    let out = step::discriminator_loss(&models, &fx.batch(), &draws, &s).unwrap();
    check(
        "logits_fake",
        &out.logits_fake,
        &fx.get("d.out.logits_fake"),
        &mut worst,
    );
    check(
        "logits_real",
        &out.logits_real,
        &fx.get("d.out.logits_real"),
        &mut worst,
    );
    check_scalar("d_loss", out.d_loss, scalar(&fx.get("d.out.d_loss")));
    let grads = out.loss.backward().unwrap();
    let named = heads.named_vars();
    let mut head_grads = GradStore::default();
    let total = scalar(&fx.get("d.out.grad_norm"));
    let mut noise_only = Vec::new();
    for (name, var) in &named {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let want = fx.get(&format!("d.out.grad.{name}"));
        if common::l2_norm(&want) < 1e-6 * total {
            // conv biases in front of a per-channel normalisation: a mathematically zero gradient, so both
            // sides hold rounding noise; compared against the total gradient norm instead
            let e = common::l2_norm(&(g - &want).unwrap()) / total;
            assert!(e <= TOL, "grad {name}: {e:.3e} of the total norm");
            noise_only.push(name.clone());
        } else {
            check(&format!("grad {name}"), g, &want, &mut worst);
        }
        head_grads.insert(var.as_tensor(), g.clone());
    }
    assert_eq!(noise_only.len(), 8, "{noise_only:?}");
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let grad_norm = clip_grad_norm(&mut head_grads, &vars, fx.f("gradient_clip")).unwrap();
    check_scalar("D grad norm", grad_norm, total);
    let lr = fx.f("lr");
    let mut opt = AdamW::new(named, fx.adam()).unwrap();
    opt.step(&head_grads, lr).unwrap();
    // parameters after the step and the u, v buffers after the two power iterations
    for (name, t) in heads.named_tensors() {
        let want = fx.get(&format!("d.out.heads.{name}"));
        if noise_only.contains(&name) {
            // AdamW's first step moves each element by at most lr whatever the gradient's size, so a gradient
            // of rounding noise gives an update of either sign (in torch too)
            let e = common::max_abs(&(&t - &want).unwrap());
            assert!(e <= 2.0 * lr * 1.0001, "head {name}: {e} > 2 lr");
        } else {
            check(&format!("head {name}"), &t, &want, &mut worst);
        }
    }
    println!("worst relative error {:.3e} ({})", worst.0, worst.1);
}
