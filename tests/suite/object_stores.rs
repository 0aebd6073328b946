//! Stores on object stores other than S3 (`s3.rs` has S3).
//!
//! * Every build: a URI whose scheme the build lacks is refused by `sprint-prep` and `sprint-train` with the
//!   cargo feature to build with (`az://` without `--features azure`), or the reason none is offered (`gs://`),
//!   instead of Lance's generic "no object store provider" message.
//! * `--features azure`: `az://` stores end to end against Azurite's Blob service on loopback (started and
//!   stopped here): three prep workers started together into one store there, equal row for row to a local
//!   single-process store; a rerun that writes nothing; `--inspect` with a worker report read from the store;
//!   two training steps reading it; pylance reading it through the same endpoint. And the writes the leases
//!   rely on: of two clients racing to create one object, or to take one over, exactly one wins.
//!
//! The Azure tests need Azurite (`scripts/azurite-env.sh` installs it with npm; `SANA_SPRINT_AZURITE` names
//! another `azurite-blob`) and the tests' Python (`scripts/py-env.sh`: pylance, and the container is made with
//! its standard library). Without them the tests fail and say so; `SANA_SPRINT_SKIP_AZURE=1` skips them on
//! purpose.

use std::path::Path;
use std::process::Command;

use crate::prep_parallel::{prep, text};

fn refused(c: &mut Command, want: &str) {
    let o = c.output().unwrap();
    let shown = text(&o);
    assert!(!o.status.success(), "{shown}");
    assert!(shown.contains(want), "wanted {want:?} in:\n{shown}");
    assert!(
        !shown.contains("No object store provider"),
        "Lance's generic message:\n{shown}"
    );
}

#[test]
fn a_scheme_this_build_lacks_is_refused_naming_the_feature_to_build_with() {
    let d = tempfile::tempdir().unwrap();
    let check = |uri: &str, want: &str| {
        refused(
            Command::new(env!("CARGO_BIN_EXE_sprint-prep")).args(["--inspect", uri]),
            want,
        );
        refused(&mut prep(Path::new(uri), "train_000.parquet", &[]), want);
        let mut train = Command::new(env!("CARGO_BIN_EXE_sprint-train"));
        train
            .args(["--demo", "--latents", uri, "--output_dir"])
            .arg(d.path().join("train"))
            .args(["--max_train_steps", "1", "--no_progress"])
            .env("HF_HUB_OFFLINE", "1");
        refused(&mut train, want);
    };
    check(
        "gs://bucket/runs/x.lance",
        "gs:// stores (Google Cloud Storage) are not offered",
    );
    if cfg!(not(feature = "azure")) {
        check(
            "az://container/runs/x.lance",
            "az:// stores (Azure Blob Storage) need a build with `--features azure`",
        );
    }
}

#[cfg(feature = "azure")]
mod azure {
    use std::collections::HashMap;
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use sana_sprint::store::location::{Files, Remote};

    use crate::prep_parallel::text;
    use crate::s3::{
        python, read_from_python_and_train, three_workers_rerun_and_inspect, Endpoint,
    };

    /// Azurite's one account and its well-known key (the emulator's documented default, not a secret).
    const ACCOUNT: &str = "devstoreaccount1";
    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    const CONTAINER: &str = "sprint-test";

    /// Creates a container with a Shared Key request (Python's standard library: the object store clients
    /// only address existing containers). Arguments: blob endpoint, account, key, container.
    const MAKE_CONTAINER: &str = r#"
import base64, hashlib, hmac, sys, urllib.request
from email.utils import formatdate
url, account, key, container = sys.argv[1:5]
headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
signed = "PUT\n" + "\n" * 11 + "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
signed += f"/{account}/{account}/{container}\nrestype:container"
sig = base64.b64encode(hmac.new(base64.b64decode(key), signed.encode(), hashlib.sha256).digest()).decode()
headers["Authorization"] = f"SharedKey {account}:{sig}"
req = urllib.request.Request(f"{url}/{account}/{container}?restype=container", method="PUT", headers=headers)
urllib.request.urlopen(req)
"#;

    /// Azurite's `azurite-blob` and the tests' Python, or `None` when the tests are skipped on request;
    /// panics with what to install otherwise.
    fn tools() -> Option<(PathBuf, PathBuf)> {
        let azurite = std::env::var_os("SANA_SPRINT_AZURITE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| {
                    PathBuf::from(h)
                        .join(".cache/sana-sprint/azurite/node_modules/.bin/azurite-blob")
                })
            })
            .filter(|p| p.is_file());
        let py = python();
        match (azurite, py) {
            (Some(a), Some(p)) => Some((a, p)),
            _ if std::env::var("SANA_SPRINT_SKIP_AZURE").as_deref() == Ok("1") => {
                eprintln!("az:// test SKIPPED on request (SANA_SPRINT_SKIP_AZURE=1)");
                None
            }
            (a, p) => panic!(
                "the az:// tests need Azurite{} and a Python with pylance{}: run scripts/azurite-env.sh \
                 (npm, node 18 or newer; or point SANA_SPRINT_AZURITE at an azurite-blob executable) and \
                 scripts/py-env.sh (or point SANA_SPRINT_TEST_PYTHON at one), or set SANA_SPRINT_SKIP_AZURE=1 \
                 to skip them",
                if a.is_none() { " (missing)" } else { "" },
                if p.is_none() { " (missing)" } else { "" },
            ),
        }
    }

    /// Azurite's Blob service on a free loopback port, storing in a temporary folder, with the test
    /// container; stopped on drop.
    struct Azurite {
        child: Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Azurite {
        fn start(bin: &Path, py: &Path) -> Azurite {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new(bin)
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .args(["--silent", "--disableTelemetry", "--skipApiVersionCheck"])
                .arg("--location")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let azurite = Azurite {
                child,
                url: format!("http://127.0.0.1:{port}"),
                _dir: dir,
            };
            let started = Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "Azurite did not listen on port {port} within 60 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let made = Command::new(py)
                .args(["-c", MAKE_CONTAINER, &azurite.url, ACCOUNT, KEY, CONTAINER])
                .output()
                .unwrap();
            assert!(
                made.status.success(),
                "creating the container: {}",
                text(&made)
            );
            azurite
        }

        /// The same endpoint as explicit storage options, the way another Azure-compatible endpoint is named
        /// (account, key, endpoint URL), for clients opened in this process.
        fn options(&self) -> HashMap<String, String> {
            [
                ("azure_storage_account_name", ACCOUNT.to_string()),
                ("azure_storage_account_key", KEY.to_string()),
                ("azure_storage_endpoint", format!("{}/{ACCOUNT}", self.url)),
                ("azure_allow_http", "true".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        }
    }

    impl Endpoint for Azurite {
        /// The variables a user sets for Azurite (README): the emulator switch, its URL, the account.
        fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
            c.env("AZURE_STORAGE_USE_EMULATOR", "true")
                .env("AZURITE_BLOB_STORAGE_URL", &self.url)
                .env("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
        }
    }

    impl Drop for Azurite {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn an_az_store_is_prepared_by_three_workers_inspected_trained_on_and_read_from_python() {
        let Some((bin, py)) = tools() else {
            return;
        };
        let azurite = Azurite::start(&bin, &py);
        let d = tempfile::tempdir().unwrap();
        let uri = format!("az://{CONTAINER}/runs/multi.lance");
        let report = format!("az://{CONTAINER}/runs/multi.worker-2-of-3.report.json");
        three_workers_rerun_and_inspect(&azurite, &py, d.path(), &uri, &report);
        read_from_python_and_train(&azurite, &py, d.path(), &uri);
    }

    /// Runs `op` on two clients of their own at the same moment (a barrier releases both); their results.
    fn race<T: Send + 'static>(
        clients: &[Files; 2],
        op: impl Fn(&Files) -> T + Send + Sync + 'static,
    ) -> [T; 2] {
        let op = Arc::new(op);
        let go = Arc::new(Barrier::new(2));
        let handles: Vec<_> = clients
            .iter()
            .map(|f| {
                let (f, op, go) = (f.clone(), op.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    op(&f)
                })
            })
            .collect();
        let mut out = handles.into_iter().map(|h| h.join().unwrap());
        [out.next().unwrap(), out.next().unwrap()]
    }

    #[test]
    fn of_two_clients_racing_to_create_or_take_over_an_object_on_azurite_exactly_one_wins() {
        let Some((bin, py)) = tools() else {
            return;
        };
        let azurite = Azurite::start(&bin, &py);
        let uri = format!("az://{CONTAINER}/race.lance");
        let open = || {
            Files::Remote(Arc::new(
                Remote::open_with(&uri, azurite.options()).unwrap(),
            ))
        };
        let clients = [open(), open()];
        let Files::Remote(remote) = &clients[0] else {
            unreachable!()
        };
        assert!(
            remote.conditional_writes().unwrap(),
            "the probe sprint-prep runs finds Azurite honouring conditional writes"
        );
        for round in 0..8 {
            let rel = format!("_sprint/leases/part-{round}.json");
            let won = race(&clients, {
                let rel = rel.clone();
                move |f| f.create(&rel, b"mine").unwrap()
            });
            assert_eq!(
                won.iter().filter(|w| **w).count(),
                1,
                "round {round}: racing creates {won:?}"
            );
            // a create after the race loses too, and the object is the winner's
            assert!(!clients[1].create(&rel, b"late").unwrap());
            assert_eq!(clients[0].get(&rel).unwrap().unwrap().bytes, b"mine");

            // both read the same version, then race to take it over (a stale lease): one wins
            let read = clients[0].get(&rel).unwrap().unwrap();
            let won = race(&clients, {
                let rel = rel.clone();
                move |f| f.take_over(&rel, b"taken", &read).unwrap()
            });
            assert_eq!(
                won.iter().filter(|w| **w).count(),
                1,
                "round {round}: racing take-overs {won:?}"
            );
            // the version read is stale now: replacing with it fails
            let stale = clients[1].get(&rel).unwrap().unwrap();
            assert!(clients[0].replace(&rel, b"again", &stale).unwrap());
            assert!(!clients[1].replace(&rel, b"lost", &stale).unwrap());
            assert_eq!(clients[1].get(&rel).unwrap().unwrap().bytes, b"again");
        }
    }
}
