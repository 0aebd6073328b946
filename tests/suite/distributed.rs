//! Data-parallel training over the CPU ring collective: the rank processes are sprint-train itself, started
//! with torchrun's variables on a free loopback port (and always stopped).

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use sana_sprint::train::checkpoint;

use crate::train_loop::{
    demo_store, fresh_heads, fresh_student, relative_update_error, saved_student, tensors, tiny_model,
};

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
    // one mean over 16 samples), measured on the updates: ‖Δ two ranks − Δ one process‖ / ‖Δ one process‖ with
    // Δ = final − initial weights. (Largest differences would be the wrong measure: AdamW's first steps move a
    // weight by ±lr whatever the size of its gradient, so a near-zero gradient whose sign the reduction order
    // flips moves that one weight by up to 2·lr.)
    let mut o = crate::train_loop::options(single.path());
    o.seed = 5;
    let student = relative_update_error(
        &fresh_student(&o),
        &saved_student(dist.path()),
        &saved_student(single.path()),
    );
    let heads = relative_update_error(
        &fresh_heads(&o),
        &tensors(&dist.path().join(checkpoint::HEADS_FILE)),
        &tensors(&single.path().join(checkpoint::HEADS_FILE)),
    );
    eprintln!("relative update error: student {student:e}, heads {heads:e}");
    assert!(student < 1e-3, "student: {student}");
    assert!(heads < 2e-2, "heads: {heads}");
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
