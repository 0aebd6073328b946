//! LADD discriminator heads and sCM / hinge loss arithmetic against the real PyTorch code (torch 2.15,
//! diffusers 0.42.1, CPU, float32): tests/fixtures/disc_heads_tiny.* and scm_loss_arith.*
//! (tools/golden/make_golden.py), disc_logits_tiny.* (tools/golden/make_golden_disc_logits.py: heads on the
//! tapped tiny teacher, with autograd gradients). All Rust computations here are f32 unless stated.

use crate::common::{assert_max_abs, fixture_path, load_fixture, max_abs, max_abs_diff};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use sana_sprint::models::discriminator::{self, DiscHeads, Mode, DEFAULT_HEAD_BLOCK_IDS};
use sana_sprint::models::sana::SanaTransformer2DModel;
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::train::loss::{
    generator_adv_loss, hinge_d_loss, normalize_tangent, scm_loss, scm_tangent, tangent_warmup,
    TimestepSampler, TANGENT_NORM_CONST,
};

/// Max abs error allowed for the heads' outputs and buffers (values of order 1).
const HEAD_ABS_TOL: f64 = 1e-5;
/// Relative error allowed for the loss arithmetic.
const LOSS_REL_TOL: f64 = 1e-5;
/// Logits and gradients through the tapped teacher: max abs error relative to the largest reference magnitude
/// of the compared set (the teacher's f32 maths adds its own rounding; the eval-mode logits reach ~47 because
/// the fixture's random u, v give a small σ, docs/ALGORITHM.md §9 #14).
const TAPPED_REL_TOL: f64 = 1e-5;

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

fn check_rel(what: &str, got: f64, want: f64, tol: f64) {
    let rel = (got - want).abs() / want.abs();
    println!("{what}: got {got:.8}, want {want:.8}, rel err {rel:.3e}");
    assert!(rel < tol, "{what}: rel err {rel:.3e} >= {tol:.1e}");
}

fn tiny_heads(block_ids: &[usize]) -> DiscHeads {
    DiscHeads::load_file(
        &fixture_path("disc_heads_tiny.safetensors"),
        block_ids,
        &Device::Cpu,
    )
    .unwrap()
}

fn named(heads: &DiscHeads) -> HashMap<String, Tensor> {
    heads.named_tensors().into_iter().collect()
}

/// The fixture input x (B, C, N) channels-last, as a teacher block emits it: (B, N, C).
fn head_input(io: &HashMap<String, Tensor>) -> Tensor {
    io["io.x"].transpose(1, 2).unwrap().contiguous().unwrap()
}

#[test]
fn head_matches_torch_in_eval_and_train_mode() {
    let io = load_fixture("disc_heads_tiny");
    let heads = tiny_heads(&[2, 8]);
    assert_eq!(heads.channels(), 16);
    let x = head_input(&io);
    let (b, n) = (x.dim(0).unwrap(), x.dim(1).unwrap());
    let head = &heads.heads()[0];

    let out_eval = head.forward(&x, Mode::Eval).unwrap();
    let want_eval = io["io.out_eval"].reshape((b, n)).unwrap();
    assert_max_abs(
        "head 0 eval (stored u, v)",
        &out_eval,
        &want_eval,
        HEAD_ABS_TOL,
    );
    // eval mode leaves the buffers alone
    let state = named(&heads);
    for key in ["0.main.0.0.weight_u", "0.main.1.fn.0.weight_v"] {
        assert_eq!(
            max_abs_diff(&state[key], &io[key]),
            0.0,
            "{key} changed in eval"
        );
    }

    let out_train = head.forward(&x, Mode::Train).unwrap();
    let want_train = io["io.out_train"].reshape((b, n)).unwrap();
    assert_max_abs(
        "head 0 train (one power iteration)",
        &out_train,
        &want_train,
        HEAD_ABS_TOL,
    );
    let state = named(&heads);
    let mut buffers = 0;
    for (key, want) in io
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("io.after.").map(|k| (k, v)))
    {
        assert_max_abs(
            &format!("updated buffer {key}"),
            &state[key],
            want,
            HEAD_ABS_TOL,
        );
        buffers += 1;
    }
    assert_eq!(buffers, 6, "three spectral convs, u and v each");
    // head 1 did not run: its buffers are the stored ones
    assert_eq!(
        max_abs_diff(&state["1.cls.weight_v"], &io["1.cls.weight_v"]),
        0.0
    );
}

#[test]
fn heads_forward_runs_head_k_on_feature_k() {
    let io = load_fixture("disc_heads_tiny");
    let heads = tiny_heads(&[2, 8]);
    let x = head_input(&io);
    let (b, n) = (x.dim(0).unwrap(), x.dim(1).unwrap());
    let other = x.affine(-0.5, 0.25).unwrap();
    let outs = heads.forward_eval(&[x.clone(), other]).unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[1].dims(), [b, n]);
    let want = io["io.out_eval"].reshape((b, n)).unwrap();
    assert_max_abs(
        "DiscHeads::forward_eval head 0",
        &outs[0],
        &want,
        HEAD_ABS_TOL,
    );
    assert!(heads.forward_eval(std::slice::from_ref(&x)).is_err());
    // bf16 features are converted to the heads' f32
    let outs = heads
        .forward_eval(&[x.to_dtype(DType::BF16).unwrap(), x.clone()])
        .unwrap();
    assert_eq!(outs[0].dtype(), DType::F32);
}

/// The tiny teacher of sana_transformer_tiny (2 blocks, inner dim 16) and the fixture's io.
fn tiny_teacher() -> (SanaTrigFlow, HashMap<String, Tensor>) {
    let tiny = crate::golden_sana::tiny();
    let vb = VarBuilder::from_tensors(tiny.teacher, DType::F32, &Device::Cpu);
    let transformer = SanaTransformer2DModel::new(&tiny.config, vb).unwrap();
    (SanaTrigFlow::new(transformer), tiny.io)
}

/// Compares gradients of the head parameters with the reference `{prefix}{name}` tensors; max abs error is
/// measured against the largest reference gradient of the set.
fn check_param_grads(
    what: &str,
    heads: &DiscHeads,
    grads: &candle_core::backprop::GradStore,
    io: &HashMap<String, Tensor>,
    prefix: &str,
) {
    let named = heads.named_vars();
    assert_eq!(named.len(), 20, "10 parameters per head");
    let scale = named
        .iter()
        .map(|(name, _)| max_abs(&io[&format!("{prefix}{name}")]))
        .fold(0.0f64, f64::max);
    let mut worst = 0.0f64;
    for (name, var) in &named {
        let grad = grads
            .get(var)
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        worst = worst.max(max_abs_diff(grad, &io[&format!("{prefix}{name}")]));
    }
    println!("{what}: max abs err {worst:.3e} over all head parameters (max |ref| {scale:.3e})");
    assert!(
        worst <= TAPPED_REL_TOL * scale,
        "{what}: max abs err {worst:.3e} > {TAPPED_REL_TOL:.0e} x {scale:.3e}"
    );
}

#[test]
fn logits_on_the_tapped_teacher_and_their_gradients_match_torch() {
    let (teacher, tiny) = tiny_teacher();
    let io = load_fixture("disc_logits_tiny");
    let heads = tiny_heads(&[0, 1]);
    let x = Var::from_tensor(&tiny["x"]).unwrap();
    let (y, t, mask) = (&tiny["y"], &tiny["t"], &tiny["mask"]);
    let cotangent = &io["io.cotangent"];

    let logits = discriminator::logits(&teacher, &x, t, y, Some(mask), &heads, Mode::Eval).unwrap();
    let want = &io["io.logits_eval"];
    let scale = max_abs(want);
    assert_max_abs("logits eval", &logits, want, TAPPED_REL_TOL * scale);
    let grads = (&logits * cotangent)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad_x = grads
        .get(&x)
        .expect("gradient reaches x through the teacher");
    let want = &io["io.grad_x"];
    assert_max_abs(
        "d logits / d x (through the teacher)",
        grad_x,
        want,
        TAPPED_REL_TOL * max_abs(want),
    );
    check_param_grads("d logits / d heads (eval)", &heads, &grads, &io, "io.grad.");

    let logits =
        discriminator::logits(&teacher, &x, t, y, Some(mask), &heads, Mode::Train).unwrap();
    let want = &io["io.logits_train"];
    assert_max_abs(
        "logits train",
        &logits,
        want,
        TAPPED_REL_TOL * max_abs(want),
    );
    let grads = (&logits * cotangent)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    check_param_grads(
        "d logits / d heads (train)",
        &heads,
        &grads,
        &io,
        "io.grad_train.",
    );
    let state = named(&heads);
    for (key, want) in io
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("io.after.").map(|k| (k, v)))
    {
        let err = max_abs_diff(&state[key], want);
        assert!(
            err <= HEAD_ABS_TOL,
            "updated buffer {key}: max abs err {err:.3e}"
        );
    }
}

#[test]
fn gradient_reaches_every_head_parameter_and_the_features() {
    // B = 10 -> two virtual batches of 5; fresh heads after a few power iterations (docs/ALGORITHM.md §9 #14)
    let (b, n, c) = (10, 12, 16);
    let dev = Device::Cpu;
    let heads = DiscHeads::new(&[1, 3], c, 7, &dev).unwrap();
    heads.power_iterations(5).unwrap();
    let features: Vec<Var> = (0..2)
        .map(|_| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, c), &dev).unwrap()).unwrap())
        .collect();
    let inputs: Vec<Tensor> = features.iter().map(|v| v.as_tensor().clone()).collect();
    for mode in [Mode::Eval, Mode::Train] {
        let outs = heads.forward(&inputs, mode).unwrap();
        let logits = Tensor::cat(&outs, 1).unwrap();
        assert_eq!(logits.dims(), [b, 2 * n]);
        let weights = Tensor::randn(0f32, 1.0, (b, 2 * n), &dev).unwrap();
        let grads = (logits * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, f) in features.iter().enumerate() {
            let g = max_abs(grads.get(f).expect("feature gradient"));
            assert!(g.is_finite() && g > 0.0, "{mode:?}: feature {i} grad {g}");
        }
        let mut largest = 0.0f64;
        let mut pre_norm_biases = Vec::new();
        for (name, var) in heads.named_vars() {
            let g = max_abs(
                grads
                    .get(&var)
                    .unwrap_or_else(|| panic!("no grad for {name}")),
            );
            assert!(g.is_finite(), "{mode:?}: {name} grad not finite");
            // A conv bias feeding BatchNormLocal is removed by its mean subtraction: zero gradient up to rounding,
            // in torch as well (the reference fixture's are ~1e-7).
            if name.ends_with(".0.0.bias") || name.ends_with(".fn.0.bias") {
                pre_norm_biases.push((name, g));
            } else {
                assert!(g > 0.0, "{mode:?}: {name} has a zero gradient");
                largest = largest.max(g);
            }
        }
        for (name, g) in pre_norm_biases {
            assert!(
                g <= 1e-4 * largest,
                "{mode:?}: {name} grad {g} vs {largest}"
            );
        }
    }
}

#[test]
fn fresh_heads_follow_torch_defaults_and_save_round_trips() {
    let dev = Device::Cpu;
    let c = 16;
    let heads = DiscHeads::new(&DEFAULT_HEAD_BLOCK_IDS, c, 11, &dev).unwrap();
    let state = named(&heads);
    assert_eq!(state.len(), 4 * 16);
    for (name, fan_in) in [("0.main.0.0", c), ("0.main.1.fn.0", 9 * c), ("3.cls", c)] {
        let bound = f64::from(1.0 / (fan_in as f32).sqrt());
        let w = max_abs(&state[&format!("{name}.weight_orig")]);
        assert!(
            w <= bound && w > 0.5 * bound,
            "{name}: max |w| {w} vs bound {bound}"
        );
        for buffer in ["weight_u", "weight_v"] {
            let norm = scalar(
                &state[&format!("{name}.{buffer}")]
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
            .sqrt();
            assert!((norm - 1.0).abs() < 1e-6, "{name}.{buffer}: norm {norm}");
        }
    }
    // Fresh heads already ran power iterations (docs/ALGORITHM.md §9 #14): σ = uᵀ W v is the top singular value,
    // within 5% of what many more iterations give (the rate depends on the spectral gap), never the random,
    // possibly tiny or negative, value of raw u, v.
    for name in ["0.main.0.0", "1.main.1.fn.0", "3.cls"] {
        let w = &state[&format!("{name}.weight_orig")];
        let w = w.reshape((w.dim(0).unwrap(), ())).unwrap();
        let sigma = |u: &Tensor, v: &Tensor| {
            scalar(
                &u.unsqueeze(0)
                    .unwrap()
                    .matmul(&w.matmul(&v.unsqueeze(1).unwrap()).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
        };
        let (mut u, mut v) = (
            state[&format!("{name}.weight_u")].clone(),
            state[&format!("{name}.weight_v")].clone(),
        );
        let s_init = sigma(&u, &v);
        for _ in 0..200 {
            let wv = w
                .matmul(&v.unsqueeze(1).unwrap())
                .unwrap()
                .squeeze(1)
                .unwrap();
            u = (&wv / scalar(&wv.sqr().unwrap().sum_all().unwrap()).sqrt() as f64).unwrap();
            let wu = w
                .t()
                .unwrap()
                .matmul(&u.unsqueeze(1).unwrap())
                .unwrap()
                .squeeze(1)
                .unwrap();
            v = (&wu / scalar(&wu.sqr().unwrap().sum_all().unwrap()).sqrt() as f64).unwrap();
        }
        let s_conv = sigma(&u, &v);
        assert!(
            s_init > 0.0 && (s_init - s_conv).abs() < 0.05 * s_conv,
            "{name}: σ {s_init} vs {s_conv}"
        );
    }
    assert_eq!(
        scalar(&state["2.main.0.1.weight"].sum_all().unwrap()),
        c as f32
    );
    assert_eq!(max_abs(&state["2.main.1.fn.1.bias"]), 0.0);
    // seeded: same seed, same heads; another seed, other heads
    let again = named(&DiscHeads::new(&DEFAULT_HEAD_BLOCK_IDS, c, 11, &dev).unwrap());
    let other = named(&DiscHeads::new(&DEFAULT_HEAD_BLOCK_IDS, c, 12, &dev).unwrap());
    let w = "1.main.1.fn.0.weight_orig";
    assert_eq!(max_abs_diff(&state[w], &again[w]), 0.0);
    assert!(max_abs_diff(&state[w], &other[w]) > 0.0);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disc_heads.safetensors");
    heads.power_iterations(2).unwrap();
    heads.save(&path).unwrap();
    let loaded = DiscHeads::load_file(&path, &DEFAULT_HEAD_BLOCK_IDS, &dev).unwrap();
    let (saved, restored) = (named(&heads), named(&loaded));
    for (key, value) in &saved {
        assert_eq!(max_abs_diff(&restored[key], value), 0.0, "{key}");
    }
    assert!(
        DiscHeads::load_file(&path, &[2, 8], &dev).is_err(),
        "head count mismatch"
    );
    assert!(
        DiscHeads::new(&[8, 2], c, 0, &dev).is_err(),
        "unordered block ids"
    );
    // as torch's view: 9 samples do not split into ceil(9/8) = 2 equal virtual batches; 1 and 16 do
    let features = |b: usize| vec![Tensor::ones((b, 12, c), DType::F32, &dev).unwrap(); 4];
    assert!(heads.forward_eval(&features(9)).is_err());
    assert!(heads.forward_eval(&features(1)).is_ok());
    assert!(heads.forward_eval(&features(16)).is_ok());
}

// ------------------------------------------------------------------ loss arithmetic (docs/ALGORITHM.md §5.4–§5.7)

struct LossFixture {
    io: HashMap<String, Tensor>,
    sigma_data: f64,
    r: f64,
}

fn loss_fixture() -> LossFixture {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("scm_loss_arith.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["c"].as_f64().unwrap(), TANGENT_NORM_CONST);
    LossFixture {
        io: load_fixture("scm_loss_arith"),
        sigma_data: json["sigma_data"].as_f64().unwrap(),
        r: json["r"].as_f64().unwrap(),
    }
}

impl LossFixture {
    fn get(&self, key: &str) -> Tensor {
        self.io[&format!("io.{key}")].clone()
    }

    /// The normalised tangent g computed by the library from the fixture's inputs.
    fn tangent(&self) -> Tensor {
        let g = scm_tangent(
            &self.get("x_t"),
            &self.get("t"),
            &self.get("dxt_dt"),
            &self.get("F"),
            &self.get("dF"),
            self.sigma_data,
            self.r,
        )
        .unwrap();
        normalize_tangent(&g, TANGENT_NORM_CONST).unwrap()
    }
}

/// Max relative error of `got` against `want`, relative to max |want|.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    max_abs_diff(got, want) / max_abs(want)
}

#[test]
fn scm_tangent_and_loss_match_torch() {
    let fx = loss_fixture();
    let g = fx.tangent();
    let rel = rel_err(&g, &fx.get("g_normalized"));
    println!("normalised tangent: max err relative to max |ref| {rel:.3e}");
    assert!(rel < LOSS_REL_TOL);

    let f = fx.get("F");
    let loss = scm_loss(&f, &f, &g, &fx.get("logvar"), &fx.get("t"), fx.sigma_data).unwrap();
    assert_eq!(loss.rank(), 0);
    check_rel(
        "sCM loss",
        scalar(&loss) as f64,
        scalar(&fx.get("loss")) as f64,
        LOSS_REL_TOL,
    );
}

#[test]
fn scm_loss_gradient_matches_finite_differences() {
    let fx = loss_fixture();
    let g = fx.tangent();
    let (t, f_minus) = (fx.get("t"), fx.get("F"));
    let f = Var::from_tensor(&f_minus).unwrap();
    let logvar = Var::from_tensor(&fx.get("logvar")).unwrap();
    let loss = scm_loss(&f, &f_minus, &g, &logvar, &t, fx.sigma_data).unwrap();
    let grads = loss.backward().unwrap();
    let grad_f = grads.get(&f).expect("d loss / d F").to_vec1_flat();
    let grad_logvar = grads
        .get(&logvar)
        .expect("d loss / d logvar")
        .to_vec1_flat();
    assert!(grad_f.iter().chain(&grad_logvar).all(|v| v.is_finite()));
    assert!(grad_f.iter().any(|v| *v != 0.0));

    // central differences in f64 with F⁻, g fixed (the loss is quadratic in F: exact up to rounding)
    let to64 = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
    let (f64_minus, g64, t64, lv64) = (to64(&f_minus), to64(&g), to64(&t), to64(&fx.get("logvar")));
    let eval = |f: &Tensor, lv: &Tensor| -> f64 {
        scm_loss(f, &f64_minus, &g64, lv, &t64, fx.sigma_data)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-3;
    let bump = |x: &Tensor, i: usize, by: f64| -> Tensor {
        let mut v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[i] += by;
        Tensor::from_vec(v, x.shape(), x.device()).unwrap()
    };
    let mut worst = 0.0f64;
    for (i, autograd) in grad_f.iter().enumerate() {
        let fd = (eval(&bump(&f64_minus, i, h), &lv64) - eval(&bump(&f64_minus, i, -h), &lv64))
            / (2.0 * h);
        worst = worst.max((fd - *autograd as f64).abs() / fd.abs().max(1e-3));
    }
    println!("d loss / d F: max rel err vs finite differences {worst:.3e}");
    assert!(worst < 1e-4);
    let mut worst = 0.0f64;
    for (i, autograd) in grad_logvar.iter().enumerate() {
        let fd = (eval(&f64_minus, &bump(&lv64, i, h)) - eval(&f64_minus, &bump(&lv64, i, -h)))
            / (2.0 * h);
        worst = worst.max((fd - *autograd as f64).abs() / fd.abs().max(1e-3));
    }
    println!("d loss / d logvar: max rel err vs finite differences {worst:.3e}");
    assert!(worst < 1e-4);
}

trait Flat {
    fn to_vec1_flat(&self) -> Vec<f32>;
}

impl Flat for Tensor {
    fn to_vec1_flat(&self) -> Vec<f32> {
        self.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
}

#[test]
fn timestep_sampler_matches_torch() {
    let fx = loss_fixture();
    let t = TimestepSampler::STUDENT
        .timesteps(&fx.get("normal_draws"))
        .unwrap();
    assert_eq!(t.dtype(), DType::F32);
    let rel = rel_err(&t, &fx.get("t_sampled"));
    println!("sampled t: max err relative to max |ref| {rel:.3e}");
    assert!(rel < LOSS_REL_TOL);
    // docs/ALGORITHM.md §5.4 sanity values: the medians (n = 0)
    let zero = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let student = scalar(&TimestepSampler::STUDENT.timesteps(&zero).unwrap());
    let disc = scalar(&TimestepSampler::DISCRIMINATOR.timesteps(&zero).unwrap());
    assert!((student - 1.1822).abs() < 1e-4, "{student}");
    assert!((disc - 0.8319).abs() < 1e-4, "{disc}");
}

#[test]
fn hinge_and_generator_losses() {
    let fx = loss_fixture();
    let (real, fake) = (fx.get("logits_real"), fx.get("logits_fake"));
    let loss = hinge_d_loss(&real, &fake).unwrap();
    check_rel(
        "hinge D loss",
        scalar(&loss) as f64,
        scalar(&fx.get("loss_D")) as f64,
        LOSS_REL_TOL,
    );
    let values = fake.to_vec1_flat();
    let mean = values.iter().map(|v| *v as f64).sum::<f64>() / values.len() as f64;
    check_rel(
        "generator adversarial loss",
        scalar(&generator_adv_loss(&fake).unwrap()) as f64,
        -mean,
        LOSS_REL_TOL,
    );
    // the hinge gradient: −0.5/n on real logits below 1, +0.5/n on fake logits above −1, else 0
    let real_var = Var::from_tensor(&real).unwrap();
    let grads = hinge_d_loss(&real_var, &fake).unwrap().backward().unwrap();
    let n = real.elem_count() as f32;
    for (v, g) in real
        .to_vec1_flat()
        .iter()
        .zip(grads.get(&real_var).unwrap().to_vec1_flat())
    {
        let want = if *v < 1.0 { -0.5 / n } else { 0.0 };
        assert!((g - want).abs() < 1e-7, "logit {v}: grad {g}, want {want}");
    }
}

#[test]
fn tangent_warmup_ramps_to_one() {
    assert_eq!(tangent_warmup(0, 4000), 0.0);
    assert_eq!(tangent_warmup(1000, 4000), 0.25);
    assert_eq!(tangent_warmup(4000, 4000), 1.0);
    assert_eq!(tangent_warmup(9000, 4000), 1.0);
    assert_eq!(tangent_warmup(5, 0), 1.0);
}
