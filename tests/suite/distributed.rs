//! Data-parallel training over the CPU ring collective: the rank processes are sprint-train itself, started
//! with torchrun's variables on a free loopback port (and always stopped).

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::train_loop::{demo_store, tensors, tiny_model};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sprint_train(out: &Path, batch: usize, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sprint-train"));
    c.arg("--pretrained_model_name_or_path")
        .arg(tiny_model())
        .arg("--latents")
        .arg(demo_store())
        .arg("--output_dir")
        .arg(out)
        .args(["--train_batch_size", &batch.to_string()])
        .args([
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--seed",
            "5",
            "--train_largest_timestep",
            "--no_progress",
            "--device",
            "cpu",
        ])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RANK")
        .env_remove("SLURM_PROCID");
    c
}

/// Waits for every child, killing all of them after `limit`.
fn wait_all(mut children: Vec<Child>, limit: Duration) -> Vec<Output> {
    let deadline = Instant::now() + limit;
    while children
        .iter_mut()
        .any(|c| c.try_wait().unwrap().is_none())
    {
        if Instant::now() > deadline {
            for c in &mut children {
                let _ = c.kill();
            }
            panic!("the rank processes did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// `world` rank processes of one run (torchrun's variables), each with `batch` samples per step.
fn run_ranks(world: usize, batch: usize, out: &Path, extra: &[&str]) -> Vec<Output> {
    let port = free_port();
    let children = (0..world)
        .map(|rank| {
            sprint_train(out, batch, extra)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("SANA_SPRINT_DIST_TIMEOUT", "60")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_all(children, Duration::from_secs(600))
}

fn assert_success(outputs: &[Output]) {
    for (rank, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {rank}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Largest |a − b| over the tensors of two safetensors files with the same names.
fn largest_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (name, x) in &a {
        let y = &b[name];
        let d = (x.to_dtype(candle_core::DType::F32).unwrap()
            - y.to_dtype(candle_core::DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        worst = worst.max(d);
    }
    worst
}

fn files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn two_ranks_train_as_one_process_with_the_global_batch() {
    let single = tempfile::tempdir().unwrap();
    let status = sprint_train(single.path(), 16, &[]).output().unwrap();
    assert_success(std::slice::from_ref(&status));

    let dist = tempfile::tempdir().unwrap();
    let outputs = run_ranks(2, 8, dist.path(), &[]);
    assert_success(&outputs);

    // only rank 0 wrote, and the same files as the single process
    assert_eq!(files(dist.path()), files(single.path()));
    let metrics = std::fs::read_to_string(dist.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");

    // f32 training: the two runs differ only by the order of float reductions (per-rank means averaged against
    // one mean over 16 samples). The student: largest difference below 5e-5 (updates are ~1e-3). The heads:
    // relative L2 below 1e-3 — their gradients pass BatchNormLocal, which cancels most of them, and AdamW's first
    // steps move a weight by ±lr whatever the size of its gradient, so a near-zero gradient whose sign the
    // reduction order flips moves single weights by up to 2·lr.
    let student = "transformer/diffusion_pytorch_model.safetensors";
    let d = largest_difference(&single.path().join(student), &dist.path().join(student));
    eprintln!("student: largest difference {d:e}");
    assert!(d < 5e-5, "student: {d}");
    let heads = "disc_heads.safetensors";
    let rel = relative_l2(&single.path().join(heads), &dist.path().join(heads));
    eprintln!("heads: relative L2 {rel:e}");
    assert!(rel < 1e-3, "heads: {rel}");
    // the logged losses are the means over the ranks: the same as the single process's
    let single_metrics = std::fs::read_to_string(single.path().join("metrics.jsonl")).unwrap();
    for (a, b) in single_metrics.lines().zip(metrics.lines()) {
        let (a, b): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(a).unwrap(), serde_json::from_str(b).unwrap());
        for key in ["scm_loss", "adv_loss", "d_loss", "grad_norm"] {
            if let (Some(x), Some(y)) = (a[key].as_f64(), b[key].as_f64()) {
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                    "{key}: {x} (one process) vs {y} (two ranks)"
                );
            }
        }
    }
}

/// ‖a − b‖ / ‖a‖ over all tensors of two safetensors files with the same names.
fn relative_l2(a: &Path, b: &Path) -> f64 {
    let (a, b) = (tensors(a), tensors(b));
    let (mut diff, mut norm) = (0f64, 0f64);
    for (name, x) in &a {
        let x = x.to_dtype(candle_core::DType::F64).unwrap();
        let y = b[name].to_dtype(candle_core::DType::F64).unwrap();
        diff += (&x - &y).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        norm += x.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    }
    (diff / norm).sqrt()
}
