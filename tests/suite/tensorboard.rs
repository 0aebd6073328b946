//! TensorBoard event files (`sana_sprint::tensorboard`) read back by TensorBoard itself: scalars from
//! `metrics.jsonl`-shaped lines (nested `"stages"` included) and a PNG, loaded by the `tensorboard` package's
//! `EventAccumulator` through `tools/read_tensorboard.py` and compared exactly (values as f32, wall times as f64);
//! and a resumed run, whose re-logged steps TensorBoard must show once, with the resumed run's values.
//!
//! Needs a Python with `tensorboard` (`scripts/py-env.sh` makes one; `SANA_SPRINT_TEST_PYTHON` names another).
//! Without one the tests fail and say so; `SANA_SPRINT_SKIP_TENSORBOARD=1` skips them on purpose.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sana_sprint::tensorboard::{purge_after, EventWriter};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The test's Python, if it has `tensorboard`; `None` when skipping on request; panics otherwise.
pub(crate) fn python() -> Option<PathBuf> {
    let py = std::env::var_os("SANA_SPRINT_TEST_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/sana-sprint/py-venv/bin/python"))
        });
    let ok = py.as_ref().is_some_and(|py| {
        Command::new(py)
            .args([
                "-c",
                "import tensorboard.backend.event_processing.event_accumulator",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if ok {
        return py;
    }
    if std::env::var("SANA_SPRINT_SKIP_TENSORBOARD").as_deref() == Ok("1") {
        eprintln!("tensorboard test SKIPPED on request (SANA_SPRINT_SKIP_TENSORBOARD=1)");
        return None;
    }
    panic!(
        "this test needs a Python with tensorboard: run scripts/py-env.sh (or point SANA_SPRINT_TEST_PYTHON \
         at one), or set SANA_SPRINT_SKIP_TENSORBOARD=1 to skip it"
    );
}

/// `tools/read_tensorboard.py DIR`'s JSON.
pub(crate) fn read_back(py: &Path, dir: &Path) -> Value {
    let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/read_tensorboard.py");
    let started = Instant::now();
    let out = Command::new(py).arg(&tool).arg(dir).output().unwrap();
    println!(
        "read_tensorboard.py took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "read_tensorboard.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "read_tensorboard.py's output is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// tag -> [(step, f32 bits of the value, f64 bits of the wall time)], as written or as read back.
type Scalars = BTreeMap<String, Vec<(i64, u32, u64)>>;

fn scalars_read(got: &Value) -> Scalars {
    got["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_i64().unwrap(),
                        p[2].as_u64().unwrap() as u32,
                        p[3].as_u64().unwrap(),
                    )
                })
                .collect();
            (tag.clone(), points)
        })
        .collect()
}

fn record(want: &mut Scalars, tag: &str, step: i64, value: f64, wall_time: f64) {
    want.entry(tag.to_string()).or_default().push((
        step,
        (value as f32).to_bits(),
        wall_time.to_bits(),
    ));
}

/// The values of one scalar tag, in TensorBoard's order.
pub(crate) fn values(got: &Value, tag: &str) -> Vec<(i64, f64)> {
    got["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar tag {tag} in {got}"))
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

#[test]
fn tensorboard_reads_back_scalars_from_metrics_lines_and_a_png_exactly() {
    let Some(py) = python() else { return };
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("logs/tensorboard"); // created by the writer
    let mut w = EventWriter::create(&dir).unwrap();
    let mut want = Scalars::new();

    // two metrics.jsonl lines as the trainer writes them: strings, nulls and arrays are not scalars
    let lines = [
        json!({"step": 1, "phase": "G", "scm_loss": 0.123456789, "adv_loss": null, "d_loss": -0.75,
               "grad_norm": 12345.678, "lr": 1e-4, "epoch": 0, "samples_per_s": 3.3,
               "latent_shape": [32, 16, 16], "nan_skips": 0,
               "stages": {"forward": 0.0123, "backward": 0.0456, "optimiser": 1e-7}}),
        json!({"step": 2, "phase": "D", "scm_loss": 0.1, "adv_loss": 2.5e-3, "d_loss": 0.693,
               "grad_norm": 1.0e30, "lr": 9.999e-5, "epoch": 1, "samples_per_s": 4.25,
               "elapsed_s": 123456789.125, "nan_skips": 3,
               "stages": {"forward": 0.0125, "backward": 0.05}}),
    ];
    for (i, line) in lines.iter().enumerate() {
        let step = line["step"].as_i64().unwrap();
        let wall_time = 1_700_000_000.0 + i as f64 * 0.3;
        let n = w.add_scalars_from_json(step, wall_time, line).unwrap();
        let mut count = 0;
        for (key, v) in line.as_object().unwrap() {
            match v {
                Value::Number(x) if key != "step" => {
                    record(&mut want, key, step, x.as_f64().unwrap(), wall_time);
                    count += 1;
                }
                Value::Object(stages) => {
                    for (stage, x) in stages {
                        let tag = format!("{key}/{stage}");
                        record(&mut want, &tag, step, x.as_f64().unwrap(), wall_time);
                        count += 1;
                    }
                }
                _ => {}
            }
        }
        assert_eq!(n, count, "scalars written for line {i}");
    }
    let wall_time = 1_700_000_001.123_456_7;
    w.add_scalar("validation/clip", 2, std::f64::consts::PI, wall_time)
        .unwrap();
    record(
        &mut want,
        "validation/clip",
        2,
        std::f64::consts::PI,
        wall_time,
    );
    w.add_scalar("validation/clip", 3, 0.0, wall_time + 1.0)
        .unwrap();
    record(&mut want, "validation/clip", 3, 0.0, wall_time + 1.0);

    // a 5x3 RGB PNG
    let img = image::RgbImage::from_fn(5, 3, |x, y| {
        image::Rgb([x as u8 * 50, y as u8 * 100, (x + y) as u8])
    });
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    w.add_png("samples/0", 2, &png, 3, 5, wall_time).unwrap();
    let e = w
        .add_png("samples/0", 2, &png, 5, 3, wall_time)
        .unwrap_err();
    assert!(e.to_string().contains("the PNG is 5x3"), "{e}");
    w.flush().unwrap();
    let path = w.path().to_path_buf();
    drop(w);
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with("events.out.tfevents.") && name.ends_with(".sana-sprint"),
        "{name}"
    );
    assert_eq!(path.parent(), Some(dir.as_path()));

    let got = read_back(&py, &dir);
    assert_eq!(scalars_read(&got), want, "scalars read back: {got}");
    let sha = format!("{:x}", Sha256::digest(&png));
    assert_eq!(
        got["images"],
        json!({"samples/0": [[2, 5, 3, png.len(), sha]]}),
        "images read back"
    );
}

#[test]
fn tensorboard_shows_a_resumed_runs_relogged_steps_once() {
    let Some(py) = python() else { return };
    let d = tempfile::tempdir().unwrap();
    // the interrupted run logged steps 1..=6; its checkpoint was at step 3; the resumed run logs 4..=7 anew
    let first_run = |dir: &Path, session: bool| {
        let mut w = EventWriter::create(dir).unwrap();
        if session {
            w.start_session(0, 1000.0).unwrap();
        }
        for step in 1..=6 {
            let line = json!({"step": step, "loss": step as f64, "stages": {"forward": 0.5}});
            w.add_scalars_from_json(step, 1000.0 + step as f64, &line)
                .unwrap();
        }
    };
    let resumed_run = |dir: &Path, session: bool| {
        let mut w = EventWriter::create(dir).unwrap();
        if session {
            w.start_session(4, 2000.0).unwrap();
        }
        for step in 4..=7 {
            let line =
                json!({"step": step, "loss": step as f64 + 0.5, "stages": {"forward": 0.25}});
            w.add_scalars_from_json(step, 2000.0 + step as f64, &line)
                .unwrap();
        }
    };
    let once = vec![
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.5),
        (5, 5.5),
        (6, 6.5),
        (7, 7.5),
    ];
    let forward_once = vec![
        (1, 0.5),
        (2, 0.5),
        (3, 0.5),
        (4, 0.25),
        (5, 0.25),
        (6, 0.25),
        (7, 0.25),
    ];

    // SessionLog START at the resumed step: TensorBoard's loader purges the orphaned steps 4..=6
    let start = d.path().join("start");
    first_run(&start, true);
    resumed_run(&start, true);
    assert_eq!(
        std::fs::read_dir(&start).unwrap().count(),
        2,
        "one file per run"
    );
    let got = read_back(&py, &start);
    assert_eq!(values(&got, "loss"), once, "with START events: {got}");
    assert_eq!(values(&got, "stages/forward"), forward_once);

    // purge_after on the older files before the resumed run starts: any reader sees one copy
    let purged = d.path().join("purged");
    first_run(&purged, false);
    assert_eq!(purge_after(&purged, 3).unwrap(), 3);
    resumed_run(&purged, false);
    let got = read_back(&py, &purged);
    assert_eq!(values(&got, "loss"), once, "after purge_after: {got}");

    // neither: TensorBoard's Python loader keeps both copies of steps 4..=6 (why the two above exist)
    let neither = d.path().join("neither");
    first_run(&neither, false);
    resumed_run(&neither, false);
    let got = read_back(&py, &neither);
    let steps: Vec<i64> = values(&got, "loss").iter().map(|p| p.0).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6, 4, 5, 6, 7], "{got}");
}
