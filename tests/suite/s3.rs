//! `s3://` stores end to end against moto's S3 server on loopback (started and stopped here): three prep
//! workers into one store on the object store, equal row for row to a local single-process store; a rerun
//! that writes nothing; `--inspect`; compaction; a few training steps reading the S3 store; the store read
//! from Python with pylance through the same endpoint.
//!
//! Needs a Python with `moto[server]` and `pylance` (`scripts/py-env.sh` makes one; `SANA_SPRINT_TEST_PYTHON`
//! names another). Without one the test fails and says so; `SANA_SPRINT_SKIP_S3=1` skips it on purpose.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::prep_parallel::{assert_ok, prep, root, text, wait_all, worker};

pub(crate) const BUCKET: &str = "sprint-test";

/// The test's Python, if it has moto and pylance.
pub(crate) fn python() -> Option<PathBuf> {
    let py = std::env::var_os("SANA_SPRINT_TEST_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/sana-sprint/py-venv/bin/python"))
        })?;
    let ok = Command::new(&py)
        .args(["-c", "import moto.server, lance, boto3"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// The test's Python for an S3 test; `None` (the test returns) when `SANA_SPRINT_SKIP_S3=1` asks to skip it;
/// without one and without that request the test fails, saying what to install.
pub(crate) fn python_or_skip() -> Option<PathBuf> {
    if let Some(py) = python() {
        return Some(py);
    }
    if std::env::var("SANA_SPRINT_SKIP_S3").as_deref() == Ok("1") {
        eprintln!("s3 test SKIPPED on request (SANA_SPRINT_SKIP_S3=1)");
        return None;
    }
    panic!(
        "this test needs a Python with moto[server] and pylance: run scripts/py-env.sh (or point \
         SANA_SPRINT_TEST_PYTHON at one), or set SANA_SPRINT_SKIP_S3=1 to skip it"
    );
}

/// moto's S3 server on a free loopback port, with a bucket; stopped on drop.
pub(crate) struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    pub(crate) fn start(py: &Path) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(py)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto's server");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto's server did not listen on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let made = moto
            .python(py)
            .args([
                "-c",
                &format!(
                    "import boto3, os; boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\
                     .create_bucket(Bucket='{BUCKET}')"
                ),
            ])
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "creating the bucket: {}",
            text(&made)
        );
        moto
    }

    /// The standard AWS variables pointing at this server.
    pub(crate) fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        c.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
    }

    pub(crate) fn python(&self, py: &Path) -> Command {
        let mut c = Command::new(py);
        self.env(&mut c);
        c
    }

    pub(crate) fn run(&self, mut c: Command) -> Output {
        self.env(&mut c).output().unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local object-store server the end-to-end tests point commands at (moto for S3, Azurite for Azure).
pub(crate) trait Endpoint {
    /// The variables a user sets for this server.
    fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command;

    fn run(&self, mut c: Command) -> Output {
        self.env(&mut c).output().unwrap()
    }
}

impl Endpoint for Moto {
    fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        Moto::env(self, c)
    }
}

/// `tools/compare_stores.py`: the store at `uri` equals the local `single` row for row, read with pylance
/// through the endpoint.
pub(crate) fn assert_same_rows(e: &impl Endpoint, py: &Path, single: &Path, uri: &str, what: &str) {
    let mut c = Command::new(py);
    c.arg(root().join("tools/compare_stores.py"))
        .arg(single)
        .arg(uri);
    let o = e.run(c);
    assert!(o.status.success(), "{what}: {}", text(&o));
}

/// The path every object-store test shares, for a store `uri` not yet written: a local single-process store
/// of the demo shards in `dir`; three workers (torchrun-style variables) started together into `uri`, equal to
/// it row for row; a rerun that finds every row stored and writes nothing; `--inspect` with worker 2's report
/// `report` read from next to the store, showing every part done and no duplicate. Returns the local store
/// and what `--inspect` printed.
pub(crate) fn three_workers_rerun_and_inspect(
    e: &impl Endpoint,
    py: &Path,
    dir: &Path,
    uri: &str,
    report: &str,
) -> (PathBuf, String) {
    let single = dir.join("single.lance");
    assert_ok(&[prep(&single, "train_*.parquet", &[]).output().unwrap()]);

    let store = Path::new(uri);
    let children = (0..3)
        .map(|r| {
            let mut c = worker(store, r, 3, &["--part_rows", "3"]);
            e.env(&mut c).spawn().unwrap()
        })
        .collect();
    assert_ok(&wait_all(children));
    assert_same_rows(e, py, &single, uri, "3 workers vs 1 local process");

    let rerun = e.run(prep(store, "train_*.parquet", &["--part_rows", "3"]));
    assert_ok(std::slice::from_ref(&rerun));
    assert!(
        text(&rerun).contains(" 0 encoded, 0 written"),
        "{}",
        text(&rerun)
    );

    let inspected = e.run(prep_inspect(uri, Some(report)));
    let shown = text(&inspected);
    assert!(inspected.status.success(), "{shown}");
    assert!(
        shown.contains("parts            9 leased, 9 done, 0 running"),
        "{shown}"
    );
    assert!(shown.contains("duplicate ids    none"), "{shown}");
    assert!(!shown.contains("no run report"), "{shown}");
    (single, shown)
}

/// The README's Python reading of the store at `uri`, then two training steps reading it (into `dir/train`).
pub(crate) fn read_from_python_and_train(e: &impl Endpoint, py: &Path, dir: &Path, uri: &str) {
    let mut read = Command::new(py);
    read.arg(root().join("tools/read_store.py")).arg(uri);
    let o = e.run(read);
    assert!(o.status.success(), "{}", text(&o));

    let train_dir = dir.join("train");
    let mut t = Command::new(env!("CARGO_BIN_EXE_sprint-train"));
    t.args(["--demo", "--latents", uri, "--output_dir"])
        .arg(&train_dir)
        .args(["--max_train_steps", "2", "--no_progress"])
        .env("HF_HUB_OFFLINE", "1");
    let trained = e.run(t);
    assert!(trained.status.success(), "{}", text(&trained));
    assert!(
        train_dir
            .join("transformer/diffusion_pytorch_model.safetensors")
            .is_file(),
        "{}",
        text(&trained)
    );
}

#[test]
fn an_s3_store_is_prepared_by_three_workers_inspected_compacted_trained_on_and_read_from_python() {
    let Some(py) = python_or_skip() else {
        return;
    };
    let moto = Moto::start(&py);
    let d = tempfile::tempdir().unwrap();
    let uri = format!("s3://{BUCKET}/runs/multi.lance");
    let report = format!("s3://{BUCKET}/runs/multi.worker-2-of-3.report.json");
    let (single, shown) = three_workers_rerun_and_inspect(&moto, &py, d.path(), &uri, &report);
    assert!(shown.contains("bad rows         "), "{shown}");

    // compaction keeps every row
    let mut c = Command::new(env!("CARGO_BIN_EXE_sprint-prep"));
    c.args(["--compact", &uri]);
    let compacted = moto.run(c);
    assert!(compacted.status.success(), "{}", text(&compacted));
    assert!(
        text(&compacted).contains("fragments"),
        "{}",
        text(&compacted)
    );
    assert_same_rows(&moto, &py, &single, &uri, "after compaction");

    read_from_python_and_train(&moto, &py, d.path(), &uri);
}

pub(crate) fn prep_inspect(uri: &str, report: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sprint-prep"));
    c.args(["--inspect", uri]);
    if let Some(r) = report {
        c.args(["--report", r]);
    }
    c
}
