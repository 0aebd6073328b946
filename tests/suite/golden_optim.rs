//! The optimiser side of the trainer against PyTorch (tools/golden/make_golden_optim.py: torch 2.15, diffusers
//! 0.42.1, CPU): 3 steps of torch AdamW (f32) with clip_grad_norm_ before each step, one parameter without a
//! gradient in step 2; the diffusers lr schedules (f64) at steps 0..60; state save/load and NaN detection.

use crate::common::{fixture_path, max_abs_diff, rel_l2};

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sana_sprint::train::optim::{
    clip_grad_norm, grads_are_finite, AdamW, AdamWConfig, LrSchedule, LrScheduleKind,
};

/// Relative L2 error tolerance of f32 AdamW/clipping against torch.
const F32_REL_TOL: f64 = 1e-6;
/// Relative error tolerance of the f64 lr schedules against diffusers.
const SCHED_REL_TOL: f64 = 1e-12;
const PARAMS: [&str; 3] = ["w", "b", "scale"];

fn fixture() -> (HashMap<String, Tensor>, serde_json::Value) {
    let tensors =
        candle_core::safetensors::load(fixture_path("optim_tiny.safetensors"), &Device::Cpu)
            .unwrap();
    let json =
        serde_json::from_str(&std::fs::read_to_string(fixture_path("optim_tiny.json")).unwrap())
            .unwrap();
    (tensors, json)
}

fn adamw_from_fixture(io: &HashMap<String, Tensor>, json: &serde_json::Value) -> AdamW {
    let cfg = &json["adamw"];
    let params = PARAMS
        .iter()
        .map(|n| {
            let var = Var::from_tensor(&io[&format!("io.init.{n}")]).unwrap();
            (n.to_string(), var)
        })
        .collect();
    let config = AdamWConfig {
        beta1: cfg["betas"][0].as_f64().unwrap(),
        beta2: cfg["betas"][1].as_f64().unwrap(),
        eps: cfg["eps"].as_f64().unwrap(),
        weight_decay: cfg["weight_decay"].as_f64().unwrap(),
    };
    AdamW::new(params, config).unwrap()
}

fn grads_for_step(io: &HashMap<String, Tensor>, opt: &AdamW, step: usize) -> GradStore {
    let mut grads = GradStore::default();
    for (name, var) in opt.params() {
        if let Some(g) = io.get(&format!("io.step{step}.grad.{name}")) {
            grads.insert(var.as_tensor(), g.clone());
        }
    }
    grads
}

fn vars(opt: &AdamW) -> Vec<Var> {
    opt.params().iter().map(|(_, v)| v.clone()).collect()
}

#[test]
fn adamw_and_clipping_match_torch() {
    let (io, json) = fixture();
    let lr = json["adamw"]["lr"].as_f64().unwrap();
    let max_norm = json["adamw"]["max_norm"].as_f64().unwrap();
    let mut opt = adamw_from_fixture(&io, &json);
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("optimizer.safetensors");
    let (mut worst_rel, mut worst_abs) = (0.0f64, 0.0f64);
    for step in 1..=3 {
        let mut grads = grads_for_step(&io, &opt, step);
        assert!(grads_are_finite(&grads, &vars(&opt)).unwrap());
        let norm = clip_grad_norm(&mut grads, &vars(&opt), max_norm).unwrap();
        let want_norm = io[&format!("io.step{step}.norm")].to_vec1::<f32>().unwrap()[0] as f64;
        let norm_rel = (norm - want_norm).abs() / want_norm;
        println!("step {step}: norm {norm} (torch {want_norm}, rel {norm_rel:.2e})");
        assert!(norm_rel < F32_REL_TOL, "step {step} norm rel {norm_rel}");

        // Resume half-way: a fresh optimiser loading step 1's state must continue bit-identically.
        if step == 2 {
            opt.save_state(&state_path).unwrap();
            let params_now: Vec<(String, Var)> = opt
                .params()
                .iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                    )
                })
                .collect();
            let mut resumed = AdamW::new(params_now, *opt.config()).unwrap();
            resumed.load_state(&state_path).unwrap();
            opt = resumed;
            grads = {
                let mut g = grads_for_step(&io, &opt, step);
                clip_grad_norm(&mut g, &vars(&opt), max_norm).unwrap();
                g
            };
        }
        opt.step(&grads, lr).unwrap();

        let saved = dir.path().join(format!("state{step}.safetensors"));
        opt.save_state(&saved).unwrap();
        let state = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
        for (name, var) in opt.params() {
            for (what, got) in [
                ("param", var.as_tensor().clone()),
                ("exp_avg", state[&format!("{name}.exp_avg")].clone()),
                ("exp_avg_sq", state[&format!("{name}.exp_avg_sq")].clone()),
            ] {
                let want = &io[&format!("io.step{step}.{what}.{name}")];
                let (rel, abs) = (rel_l2(&got, want), max_abs_diff(&got, want));
                println!("step {step} {what}.{name}: rel {rel:.2e} max abs {abs:.2e}");
                assert!(rel < F32_REL_TOL, "step {step} {what}.{name}: rel {rel}");
                worst_rel = worst_rel.max(rel);
                worst_abs = worst_abs.max(abs);
            }
        }
        // The update is far above the tolerance, so the comparison above can fail.
        for name in PARAMS {
            let moved = rel_l2(
                &io[&format!("io.step{step}.param.{name}")],
                &io[&format!("io.init.{name}")],
            );
            assert!(moved > 100.0 * F32_REL_TOL, "{name} barely moved: {moved}");
        }
        // `scale` has no gradient in step 2: torch skips it entirely, so its step count stays behind.
        let scale_steps = state["scale.step"].to_scalar::<i64>().unwrap();
        assert_eq!(scale_steps, if step == 1 { 1 } else { step as i64 - 1 });
        assert_eq!(
            opt.step_counts(),
            vec![step as i64, step as i64, scale_steps]
        );
    }
    println!("AdamW worst: rel {worst_rel:.2e} max abs {worst_abs:.2e}");
}

#[test]
fn state_save_load_round_trip_is_bit_exact() {
    let (io, json) = fixture();
    let mut opt = adamw_from_fixture(&io, &json);
    let mut grads = grads_for_step(&io, &opt, 1);
    clip_grad_norm(&mut grads, &vars(&opt), 0.1).unwrap();
    opt.step(&grads, 1e-3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("a.safetensors");
    let second = dir.path().join("b.safetensors");
    opt.save_state(&first).unwrap();
    let mut reloaded = adamw_from_fixture(&io, &json);
    reloaded.load_state(&first).unwrap();
    reloaded.save_state(&second).unwrap();
    let a = candle_core::safetensors::load(&first, &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&second, &Device::Cpu).unwrap();
    assert_eq!(a.len(), 9);
    for (key, ta) in &a {
        let tb = &b[key];
        assert_eq!(ta.dtype(), tb.dtype(), "{key}");
        let (ba, bb) = match ta.dtype() {
            DType::I64 => (
                vec![ta.to_scalar::<i64>().unwrap() as u64],
                vec![tb.to_scalar::<i64>().unwrap() as u64],
            ),
            _ => (bits(ta), bits(tb)),
        };
        assert_eq!(ba, bb, "{key} differs after a save/load round trip");
    }

    // A state saved for other parameter names is rejected with the missing key.
    let renamed = vec![(
        "other".to_string(),
        Var::from_tensor(&io["io.init.b"]).unwrap(),
    )];
    let mut wrong = AdamW::new(renamed, AdamWConfig::default()).unwrap();
    let err = wrong.load_state(&first).unwrap_err().to_string();
    assert!(err.contains("other.exp_avg"), "{err}");

    // A state with entries for parameters the optimiser does not hold is rejected too.
    let subset = vec![("b".to_string(), Var::from_tensor(&io["io.init.b"]).unwrap())];
    let mut partial = AdamW::new(subset, AdamWConfig::default()).unwrap();
    let err = partial.load_state(&first).unwrap_err().to_string();
    assert!(
        err.contains("unknown parameters") && err.contains("w.exp_avg"),
        "{err}"
    );
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits() as u64)
        .collect()
}

#[test]
fn non_finite_gradients_are_detected() {
    let (io, json) = fixture();
    let opt = adamw_from_fixture(&io, &json);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut grads = grads_for_step(&io, &opt, 1);
        let (_, b) = &opt.params()[1];
        let poisoned = Tensor::new(&[0.5f32, bad, -1.0], &Device::Cpu).unwrap();
        grads.insert(b.as_tensor(), poisoned);
        assert!(!grads_are_finite(&grads, &vars(&opt)).unwrap(), "{bad}");
        let norm = clip_grad_norm(&mut grads, &vars(&opt), 0.1).unwrap();
        assert!(!norm.is_finite());
    }
    // Huge but finite f32 gradients are finite (their squares are summed in f64).
    let mut grads = GradStore::default();
    let (_, b) = &opt.params()[1];
    grads.insert(
        b.as_tensor(),
        Tensor::new(&[f32::MAX, f32::MAX, 1.0], &Device::Cpu).unwrap(),
    );
    assert!(grads_are_finite(&grads, &vars(&opt)).unwrap());
}

#[test]
fn lr_schedules_match_diffusers() {
    let (io, json) = fixture();
    let s = &json["schedules"];
    let base_lr = s["base_lr"].as_f64().unwrap();
    let warmup = s["warmup"].as_u64().unwrap();
    let total = s["total"].as_u64().unwrap();
    let num_cycles = s["num_cycles"].as_u64().unwrap();
    let power = s["power"].as_f64().unwrap();
    let names = s["names"].as_array().unwrap();
    assert_eq!(names.len(), LrScheduleKind::ALL.len());
    let mut worst = 0.0f64;
    for name in names {
        let name = name.as_str().unwrap();
        let kind: LrScheduleKind = name.parse().unwrap();
        assert_eq!(kind.name(), name);
        let schedule = LrSchedule::new(kind, base_lr, warmup, total, num_cycles, power).unwrap();
        let want = io[&format!("io.sched.{name}")].to_vec1::<f64>().unwrap();
        for (step, want) in want.iter().enumerate() {
            let got = schedule.lr_at(step as u64);
            let rel = (got - want).abs() / want.abs().max(1e-300);
            let rel = if *want == 0.0 { got.abs() } else { rel };
            assert!(
                rel < SCHED_REL_TOL,
                "{name} step {step}: {got} vs diffusers {want}"
            );
            worst = worst.max(rel);
        }
    }
    println!("schedules worst rel {worst:.2e}");

    let err = "cosine_restarts"
        .parse::<LrScheduleKind>()
        .unwrap_err()
        .to_string();
    for valid in LrScheduleKind::ALL {
        assert!(err.contains(valid.name()), "{err}");
    }
    assert!(LrSchedule::new(LrScheduleKind::Polynomial, 1e-8, 10, 50, 1, 1.0).is_err());
}
