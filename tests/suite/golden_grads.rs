//! Reverse-mode gradients through the student and the frozen teacher against PyTorch autograd
//! (tools/golden/make_golden_grads.py: torch 2.15, diffusers 0.42.1, CPU, float32) on the tiny 2-block D=16
//! transformer fixture. Rust side in f32: the student as trainable `Var`s ([`Student::from_weights`], linear
//! self-attention), the teacher as plain tensors with only its input a `Var` (the adversarial term's path).

use crate::common;
use crate::common::{assert_close, fixture_path, load_fixture, max_abs_diff, rel_l2};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use sana_sprint::models::sana::{SanaConfig, SanaTransformer2DModel};
use sana_sprint::models::student::Student;
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::models::weights::Weights;
use sana_sprint::nn::dual::Dual;

/// Tolerance on the relative L2 error of every f32 gradient against torch.
const REL_TOL: f64 = 1e-4;

fn tiny_config() -> SanaConfig {
    common::fixture_config("sana_grads_tiny")
}

/// `sum(a ⊙ b)` as a scalar tensor (keeps the graph).
fn dot(a: &Tensor, b: &Tensor) -> Tensor {
    (a * b).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

#[test]
fn student_parameter_and_input_gradients_match_torch_autograd() {
    let dev = Device::Cpu;
    let fx = load_fixture("sana_transformer_tiny");
    let io = load_fixture("sana_grads_tiny");
    let weights = Weights::from_files(&[fixture_path("sana_transformer_tiny.safetensors")])
        .unwrap()
        .strip_prefix("student.");
    let student = Student::from_weights(&tiny_config(), weights, &dev).unwrap();
    let x = Var::from_tensor(&fx["io.x"]).unwrap();
    let t = Var::from_tensor(&fx["io.t"]).unwrap();
    let (y, mask, g) = (&fx["io.y"], &fx["io.mask"], &fx["io.guidance"]);

    let f = student
        .model
        .forward(
            &Dual::constant(x.as_tensor().clone()),
            y,
            &Dual::constant(t.as_tensor().clone()),
            Some(g),
            Some(mask),
        )
        .unwrap()
        .primal;
    let logvar = student.model.logvar(t.as_tensor(), Some(g)).unwrap();
    let loss =
        (dot(&f, &io["io.student_cotangent"]) + dot(&logvar, &io["io.logvar_cotangent"])).unwrap();
    let (got, want) = (scalar(&loss), scalar(&io["io.student_loss"]));
    println!("student loss {got:.7} (torch {want:.7})");
    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0));
    let grads = loss.backward().unwrap();

    let mut checked = vec![
        ("d/dx".to_string(), x.as_tensor().clone(), "student_grad_x"),
        ("d/dt".to_string(), t.as_tensor().clone(), "student_grad_t"),
    ];
    let vars = student.named_vars();
    let torch_names = io
        .keys()
        .filter_map(|k| k.strip_prefix("io.student_grad."))
        .count();
    assert_eq!(
        vars.len(),
        torch_names,
        "every torch parameter has a Var and vice versa"
    );
    let names: Vec<String> = vars
        .iter()
        .map(|(n, _)| format!("student_grad.{n}"))
        .collect();
    for ((name, var), key) in vars.iter().zip(&names) {
        checked.push((name.clone(), var.as_tensor().clone(), key.as_str()));
    }
    let (mut worst_rel, mut worst_abs) = ((0.0, String::new()), 0.0f64);
    for (name, tensor, key) in &checked {
        let want = &io[&format!("io.{key}")];
        let got = grads
            .get(tensor)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let (rel, abs) = (rel_l2(got, want), max_abs_diff(got, want));
        assert!(
            rel < REL_TOL,
            "{name}: gradient relative L2 error {rel:.3e} >= {REL_TOL:.0e} (max abs {abs:.3e})"
        );
        if rel > worst_rel.0 {
            worst_rel = (rel, name.clone());
        }
        worst_abs = worst_abs.max(abs);
    }
    println!(
        "{} student gradients: max relative L2 error {:.3e} ({}), max abs error {worst_abs:.3e}",
        checked.len(),
        worst_rel.0,
        worst_rel.1
    );
}

#[test]
fn input_gradient_through_the_frozen_teacher_matches_torch_autograd() {
    let dev = Device::Cpu;
    let fx = load_fixture("sana_transformer_tiny");
    let io = load_fixture("sana_grads_tiny");
    let teacher_weights: HashMap<String, Tensor> = fx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("teacher.")
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    let cfg = tiny_config();
    let teacher = SanaTrigFlow::new(
        SanaTransformer2DModel::new(
            &cfg,
            VarBuilder::from_tensors(teacher_weights, DType::F32, &dev),
        )
        .unwrap(),
    );
    let x = Var::from_tensor(&fx["io.x"]).unwrap();
    let (y, mask, t) = (&fx["io.y"], &fx["io.mask"], &fx["io.t"]);
    let f = teacher
        .forward(
            &Dual::constant(x.as_tensor().clone()),
            y,
            &Dual::constant(t.clone()),
            None,
            Some(mask),
        )
        .unwrap()
        .primal;
    let taps = teacher
        .block_outputs(x.as_tensor(), y, t, None, Some(mask), &[0, 1])
        .unwrap();
    let mut loss = dot(&f, &io["io.teacher_cotangent"]);
    for (k, tap) in taps.iter().enumerate() {
        loss = (loss + dot(tap, &io[&format!("io.teacher_tap_cotangent.{k}")])).unwrap();
    }
    let (got, want) = (scalar(&loss), scalar(&io["io.teacher_loss"]));
    println!("teacher loss {got:.7} (torch {want:.7})");
    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0));
    let grads = loss.backward().unwrap();
    let grad_x = grads.get(x.as_tensor()).expect("gradient w.r.t. the input");
    assert_close("teacher d/dx", grad_x, &io["io.teacher_grad_x"], REL_TOL);
}
