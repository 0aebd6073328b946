//! Parity of one generator step and one discriminator step with a PyTorch statement of the reference maths
//! with the recommended fixes (tools/golden/make_golden_step.py → tests/fixtures/train_step_tiny.*), every
//! random draw injected: losses, intermediate tensors, pre-clip gradients and norms, and the parameters after
//! the clipped AdamW update. f32; relative L2 error ≤ 1e-4 per tensor and relative error ≤ 1e-4 per scalar.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use sana_sprint::models::discriminator::DiscHeads;
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel, TextContext};
use sana_sprint::models::student::Student;
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::models::weights::Weights;
use sana_sprint::rng::SeededRng;
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
        Self::named("train_step_tiny")
    }

    /// `train_step_tiny_HxW`: a slim fixture at a non-square latent size (no weights of its own: the student
    /// and heads come from the square fixture, drawn from the same seeds before the batch).
    fn named(name: &str) -> Self {
        let path = common::fixture_path(&format!("{name}.safetensors"));
        let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(common::fixture_path(&format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let path = if cfg["slim"].as_bool() == Some(true) {
            common::fixture_path("train_step_tiny.safetensors")
        } else {
            path
        };
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

    /// The generator step's injected draws.
    fn generator_draws(&self) -> GeneratorDraws {
        let fx = self;
        GeneratorDraws {
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
        }
    }

    /// The discriminator step's injected draws.
    fn discriminator_draws(&self) -> DiscriminatorDraws {
        let fx = self;
        DiscriminatorDraws {
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

fn check(name: &str, ours: &Tensor, want: &Tensor, worst: &mut (f64, String)) {
    let ours = if ours.dims() != want.dims() && ours.elem_count() == want.elem_count() {
        ours.reshape(want.dims()).unwrap()
    } else {
        ours.clone()
    };
    let e = common::rel_l2(&ours, want);
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
    let compute = student.compute_models(DType::F32).unwrap();
    let models = Models::new(&teacher, &compute, &heads);
    let draws = fx.generator_draws();
    let global_step = fx.f("global_step") as u64;
    let batch = fx.batch();
    let mut worst = (0.0, String::new());
    for checkpointing in [true, false] {
        let models = Models {
            gradient_checkpointing: checkpointing,
            ..models
        };
        let named = student.named_vars();
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let (mut student_grads, out) =
            step::generator_grads(&models, &batch, &draws, &s, global_step, &vars, 1.0).unwrap();
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

        for (name, var) in &named {
            let g = student_grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            check(
                &format!("grad {name} (checkpointing {checkpointing})"),
                g,
                &fx.get(&format!("g.out.grad.{name}")),
                &mut worst,
            );
        }
        if !checkpointing {
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

#[test]
fn discriminator_step_matches_reference() {
    let fx = Fixture::load();
    let s = fx.settings();
    let teacher = fx.teacher();
    let student = fx.student();
    let heads = fx.heads();
    let compute = student.compute_models(DType::F32).unwrap();
    let models = Models::new(&teacher, &compute, &heads);
    let draws = fx.discriminator_draws();
    let mut worst = (0.0, String::new());
    let (mut head_grads, out) =
        step::discriminator_grads(&models, &fx.batch(), &draws, &s, &heads.vars(), 1.0).unwrap();
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
    let named = heads.named_vars();
    let total = scalar(&fx.get("d.out.grad_norm"));
    let mut noise_only = Vec::new();
    for (name, var) in &named {
        let g = head_grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .clone();
        let want = fx.get(&format!("d.out.grad.{name}"));
        if common::l2_norm(&want) < 1e-6 * total {
            // conv biases in front of a per-channel normalisation: a mathematically zero gradient, so both
            // sides hold rounding noise; compared against the total gradient norm instead
            let e = common::l2_norm(&(&g - &want).unwrap()) / total;
            assert!(e <= TOL, "grad {name}: {e:.3e} of the total norm");
            noise_only.push(name.clone());
        } else {
            check(&format!("grad {name}"), &g, &want, &mut worst);
        }
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

/// The trainer computes the teacher's negative text context once per run ([`step::negative_context`], passed as
/// `Models::teacher_negative`); every generator and discriminator result must equal the per-step computation.
#[test]
fn cached_negative_context_equals_the_per_step_one() {
    let fx = Fixture::load();
    let s = fx.settings();
    let (teacher, student, heads) = (fx.teacher(), fx.student(), fx.heads());
    let compute = student.compute_models(DType::F32).unwrap();
    let batch = fx.batch();
    // the negative prompt is padded, so a context that ignored its mask would differ
    assert!(
        common::max_abs(&(batch.neg_mask.ones_like().unwrap() - &batch.neg_mask).unwrap()) > 0.0
    );
    let cached = step::negative_context(&teacher, &batch.neg_embeds, &batch.neg_mask).unwrap();
    let per_step = Models::new(&teacher, &compute, &heads);
    let with_cache = Models {
        teacher_negative: Some(&cached),
        ..per_step
    };
    let student_vars: Vec<Var> = student.named_vars().into_iter().map(|(_, v)| v).collect();
    let same = |what: &str, got: &Tensor, want: &Tensor| {
        let d = common::max_abs_diff(got, want);
        assert!(d == 0.0, "{what}: cached negative context differs by {d:e}");
    };

    let mut rng = SeededRng::new(21);
    let g = GeneratorDraws::sample(&mut rng, batch.x0.dims(), &s, &Device::Cpu).unwrap();
    let run_g =
        |m: &Models| step::generator_grads(m, &batch, &g, &s, 100, &student_vars, 1.0).unwrap();
    let (grads_cached, out_cached) = run_g(&with_cache);
    let (grads, out) = run_g(&per_step);
    same("G loss", &out_cached.loss, &out.loss);
    same("dxt_dt", &out_cached.dxt_dt, &out.dxt_dt);
    same("G logits", &out_cached.logits, &out.logits);
    for v in &student_vars {
        same(
            "student grad",
            grads_cached.get(v.as_tensor()).unwrap(),
            grads.get(v.as_tensor()).unwrap(),
        );
    }

    // a D step runs a power iteration in the heads: each side gets its own copy of the heads
    let d = DiscriminatorDraws::sample(&mut rng, batch.x0.dims(), &s, &Device::Cpu).unwrap();
    let run_d = |heads: &DiscHeads, cache: Option<&TextContext>| {
        let m = Models {
            teacher_negative: cache,
            ..Models::new(&teacher, &compute, heads)
        };
        let (grads, out) =
            step::discriminator_grads(&m, &batch, &d, &s, &heads.vars(), 1.0).unwrap();
        let grads: Vec<Tensor> = heads
            .vars()
            .iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().clone())
            .collect();
        (grads, out)
    };
    let (grads_cached, out_cached) = run_d(&fx.heads(), Some(&cached));
    let (grads, out) = run_d(&fx.heads(), None);
    same("D loss", &out_cached.loss, &out.loss);
    same("logits_fake", &out_cached.logits_fake, &out.logits_fake);
    same("logits_real", &out_cached.logits_real, &out.logits_real);
    for (a, b) in grads_cached.iter().zip(&grads) {
        same("head grad", a, b);
    }
}

/// The G and D steps at non-square latent sizes (aspect-ratio buckets): 2:1 (4×2) and 1:3 (2×6) latents against
/// the reference, through every output, the losses and the clipped gradient norms (the slim fixtures keep no
/// per-tensor gradients; the square fixture checks those and the AdamW update). Tolerance as above, f32.
#[test]
fn steps_match_reference_at_non_square_latent_sizes() {
    let square = Fixture::load();
    for name in ["train_step_tiny_4x2", "train_step_tiny_2x6"] {
        let fx = Fixture::named(name);
        // the weights read from the square fixture are the ones this fixture was made with
        let sum: f64 = candle_core::safetensors::load(&square.path, &Device::Cpu)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("student.") || k.starts_with("heads."))
            .map(|(_, t)| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum();
        let want_sum = fx.f("init_weights_sum");
        assert!(
            (sum - want_sum).abs() <= 1e-9 * want_sum.abs(),
            "{name}: {sum} vs {want_sum}"
        );
        let (h, w) = (
            fx.cfg["batch"]["H"].as_u64().unwrap(),
            fx.cfg["batch"]["W"].as_u64().unwrap(),
        );
        assert_ne!(h, w);
        assert_eq!(fx.get("batch.x0").dims()[2..], [h as usize, w as usize]);
        let s = fx.settings();
        let (teacher, student, heads) = (fx.teacher(), fx.student(), fx.heads());
        let compute = student.compute_models(DType::F32).unwrap();
        let models = Models::new(&teacher, &compute, &heads);
        let mut worst = (0.0, String::new());

        let draws = fx.generator_draws();
        let named = student.named_vars();
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let (mut grads, out) = step::generator_grads(
            &models,
            &fx.batch(),
            &draws,
            &s,
            fx.f("global_step") as u64,
            &vars,
            1.0,
        )
        .unwrap();
        for (what, ours, key) in [
            ("dxt_dt", &out.dxt_dt, "g.out.dxt_dt"),
            ("dF", &out.df, "g.out.dF"),
            ("F", &out.f, "g.out.F"),
            ("logvar", &out.logvar, "g.out.logvar"),
            ("x0_pred", &out.x0_pred, "g.out.x0_pred"),
            ("logits", &out.logits, "g.out.logits"),
        ] {
            check(&format!("{name} {what}"), ours, &fx.get(key), &mut worst);
        }
        check_scalar("scm_loss", out.scm_loss, scalar(&fx.get("g.out.scm_loss")));
        check_scalar("adv_loss", out.adv_loss, scalar(&fx.get("g.out.adv_loss")));
        let norm = clip_grad_norm(&mut grads, &vars, fx.f("gradient_clip")).unwrap();
        check_scalar("G grad norm", norm, scalar(&fx.get("g.out.grad_norm")));

        let draws = fx.discriminator_draws();
        let (mut head_grads, out) =
            step::discriminator_grads(&models, &fx.batch(), &draws, &s, &heads.vars(), 1.0)
                .unwrap();
        check(
            &format!("{name} logits_fake"),
            &out.logits_fake,
            &fx.get("d.out.logits_fake"),
            &mut worst,
        );
        check(
            &format!("{name} logits_real"),
            &out.logits_real,
            &fx.get("d.out.logits_real"),
            &mut worst,
        );
        check_scalar("d_loss", out.d_loss, scalar(&fx.get("d.out.d_loss")));
        let head_vars: Vec<Var> = heads.named_vars().into_iter().map(|(_, v)| v).collect();
        let norm = clip_grad_norm(&mut head_grads, &head_vars, fx.f("gradient_clip")).unwrap();
        check_scalar("D grad norm", norm, scalar(&fx.get("d.out.grad_norm")));
        println!("{name}: worst relative error {:.3e} ({})", worst.0, worst.1);
    }
}
