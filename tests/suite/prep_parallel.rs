//! sprint-prep workers sharing one store: three workers (torchrun-style variables) against one process, a
//! worker killed after its first commit and rerun, and two identical runs started at the same moment on a new
//! and on an existing store. Every row exactly once, whatever happens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sana_sprint::store::{LatentRow, LatentStore};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The demo shards (3 × 8 rows, some of them bad on purpose) through the tiny pipeline at 64².
pub fn prep(out: &Path, shards: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sprint-prep"));
    c.args([
        "--pretrained_model_name_or_path",
        root().join("datasets/tiny-sana-sprint").to_str().unwrap(),
        "--file_path",
        root().join("datasets/demo").join(shards).to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--resolution",
        "64",
        "--batch_size",
        "2",
        "--commit_every",
        "2",
        "--device",
        "cpu",
        "--num_workers",
        "1",
        "--no_progress",
    ])
    .args(extra)
    .env("HF_HUB_OFFLINE", "1")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

pub fn worker(out: &Path, rank: usize, world: usize, extra: &[&str]) -> Command {
    let mut c = prep(out, "train_*.parquet", extra);
    c.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1");
    c
}

pub fn wait_all(children: Vec<Child>) -> Vec<Output> {
    let started = Instant::now();
    children
        .into_iter()
        .map(|mut c| {
            while c.try_wait().unwrap().is_none() {
                if started.elapsed() > Duration::from_secs(300) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            c.wait_with_output().unwrap()
        })
        .collect()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn assert_ok(outputs: &[Output]) {
    for (i, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "process {i}: {}", text(o));
    }
}

/// The store's rows by id; fails on a duplicate id.
pub fn rows(store: &Path) -> BTreeMap<String, LatentRow> {
    let all = LatentStore::open(store).unwrap().read_all().unwrap();
    let n = all.len();
    let map: BTreeMap<String, LatentRow> = all.into_iter().map(|r| (r.id.clone(), r)).collect();
    assert_eq!(
        map.len(),
        n,
        "{} duplicate id(s) in {}",
        n - map.len(),
        store.display()
    );
    map
}

/// Same ids, captions, shapes and prompt lengths; floats equal up to the batching of the CPU kernels (the
/// workers' device batches hold other rows than the single process's): f32 latents within 1e-5 relative,
/// f16 prompt embeddings within one f16 step (1e-3 relative).
fn assert_same_rows(got: &BTreeMap<String, LatentRow>, want: &BTreeMap<String, LatentRow>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let close = |a: &[f32], b: &[f32], tol: f32, what: &str, id: &str| {
        assert_eq!(a.len(), b.len(), "{id} {what}");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{id} {what}: {x} vs {y}"
            );
        }
    };
    for (id, w) in want {
        let g = &got[id];
        assert_eq!(
            (&g.caption, g.latent_shape, g.prompt_len),
            (&w.caption, w.latent_shape, w.prompt_len),
            "{id}"
        );
        close(&g.latent, &w.latent, 1e-5, "latent", id);
        close(
            &g.prompt_embeds,
            &w.prompt_embeds,
            1e-3,
            "prompt_embeds",
            id,
        );
    }
}

#[test]
fn three_workers_make_the_single_process_store_and_survive_a_killed_worker() {
    let d = tempfile::tempdir().unwrap();
    let single = d.path().join("single.lance");
    let out = prep(&single, "train_*.parquet", &[]).output().unwrap();
    assert_ok(std::slice::from_ref(&out));
    let want = rows(&single);
    assert!(want.len() >= 18, "{} rows", want.len());

    // three workers at once, parts of 3 rows (so shards are split between workers)
    let multi = d.path().join("multi.lance");
    let children = (0..3)
        .map(|r| worker(&multi, r, 3, &["--part_rows", "3"]).spawn().unwrap())
        .collect();
    let outputs = wait_all(children);
    assert_ok(&outputs);
    assert_same_rows(&rows(&multi), &want);
    for r in 0..3 {
        let report = d.path().join(format!("multi.worker-{r}-of-3.report.json"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(json["parts_total"], 9, "{json}");
        assert_eq!(json["duplicate_ids"], 0, "{json}");
    }
    // inspect shows every part done
    let insp = Command::new(env!("CARGO_BIN_EXE_sprint-prep"))
        .args(["--inspect", multi.to_str().unwrap()])
        .output()
        .unwrap();
    let shown = text(&insp);
    assert!(
        shown.contains("parts            9 leased, 9 done, 0 running"),
        "{shown}"
    );
    assert!(shown.contains("duplicate ids    none"), "{shown}");

    // worker 1 of 3 is killed after its first commit; the others finish; worker 1 reruns and completes
    let killed = d.path().join("killed.lance");
    let children = (0..3)
        .map(|r| {
            let mut c = worker(&killed, r, 3, &["--part_rows", "3"]);
            if r == 1 {
                c.env("SPRINT_PREP_KILL_AFTER_COMMITS", "1");
            }
            c.spawn().unwrap()
        })
        .collect();
    let outputs = wait_all(children);
    assert!(
        !outputs[1].status.success(),
        "worker 1 must have been killed"
    );
    assert_ok(&[outputs[0].clone(), outputs[2].clone()]);
    let partial = rows(&killed);
    assert!(partial.len() < want.len(), "{} rows", partial.len());
    let insp = Command::new(env!("CARGO_BIN_EXE_sprint-prep"))
        .args(["--inspect", killed.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(text(&insp).contains("STALE"), "{}", text(&insp));
    let rerun = worker(&killed, 1, 3, &["--part_rows", "3"])
        .output()
        .unwrap();
    assert_ok(std::slice::from_ref(&rerun));
    assert!(
        text(&rerun).contains("taking it over"),
        "the rerun takes over the dead worker's part: {}",
        text(&rerun)
    );
    assert_same_rows(&rows(&killed), &want);
}

#[test]
fn two_identical_runs_at_once_never_store_a_row_twice_on_a_new_or_an_existing_store() {
    let d = tempfile::tempdir().unwrap();
    let single = d.path().join("single.lance");
    assert_ok(&[prep(&single, "train_*.parquet", &[]).output().unwrap()]);
    let want = rows(&single);

    for existing in [false, true] {
        let store = d.path().join(format!("race-{existing}.lance"));
        if existing {
            // a store that already holds the first shard
            assert_ok(&[prep(&store, "train_000.parquet", &[]).output().unwrap()]);
        }
        let children = (0..2)
            .map(|_| prep(&store, "train_*.parquet", &[]).spawn().unwrap())
            .collect();
        let outputs = wait_all(children);
        assert_ok(&outputs);
        assert_same_rows(&rows(&store), &want);
        // the run that found parts leased says so: it waited for them, or found them finished
        let said: String = outputs.iter().map(text).collect();
        assert!(
            said.contains("is being encoded by another worker")
                || said.contains("finished by other workers"),
            "existing {existing}: {said}"
        );
    }
}
