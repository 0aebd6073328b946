//! A watchdog for waits that have no timeout of their own (NCCL's collectives on a blocking communicator): a
//! wait that outlives the run's timeout ends the process with status 1 and a message naming the rank and the
//! wait, as PyTorch's NCCL watchdog does. Nothing is written in between, so the last checkpoint stays the
//! resume point.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Result;

/// What is being waited for, since when.
type Armed = Arc<Mutex<Option<(Instant, String)>>>;

/// One rank's watchdog: a thread that checks the guarded wait every 200 ms; it stops with the watchdog.
pub struct Watchdog {
    armed: Armed,
}

impl Watchdog {
    /// Starts the thread; `what` names the engine in messages (e.g. "NCCL").
    pub fn start(rank: usize, what: &'static str, timeout: Duration) -> Watchdog {
        let armed: Armed = Arc::new(Mutex::new(None));
        let seen = Arc::downgrade(&armed);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let Some(armed) = seen.upgrade() else {
                return; // the watchdog was dropped
            };
            let late = armed.lock().ok().and_then(|a| {
                a.as_ref()
                    .filter(|(since, _)| since.elapsed() > timeout)
                    .map(|(_, wait)| wait.clone())
            });
            if let Some(wait) = late {
                eprintln!(
                    "error: rank {rank}: {what}: {wait} did not finish within the {} s timeout ({}): another \
                     rank died, hangs, or cannot reach this one (NCCL_DEBUG=INFO says more); exiting. Restart \
                     every rank with --resume_from_checkpoint latest.",
                    timeout.as_secs_f64(),
                    super::TIMEOUT_ENV
                );
                std::process::exit(1);
            }
        });
        Watchdog { armed }
    }

    /// Runs `f` under the watchdog: if it has not returned within the timeout, the process ends.
    pub fn guard<R>(&self, wait: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if let Ok(mut a) = self.armed.lock() {
            *a = Some((Instant::now(), wait.to_string()));
        }
        let r = f();
        if let Ok(mut a) = self.armed.lock() {
            *a = None;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "SANA_SPRINT_WATCHDOG_TEST_CHILD";

    #[test]
    fn waits_that_finish_in_time_pass_through() {
        let w = Watchdog::start(0, "test", Duration::from_millis(400));
        for i in 0..3 {
            let got = w
                .guard("a short wait", || {
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(i)
                })
                .unwrap();
            assert_eq!(got, i);
        }
        // between guarded waits nothing is armed: idling past the timeout is fine
        std::thread::sleep(Duration::from_millis(900));
    }

    /// Runs itself again as a child that hangs in a guarded wait: the child must end with status 1 and say
    /// which wait on which rank, well before the hang would end.
    #[test]
    fn a_wait_past_the_timeout_ends_the_process_naming_rank_and_wait() {
        if std::env::var(CHILD).is_ok() {
            let w = Watchdog::start(3, "NCCL", Duration::from_millis(300));
            let _ = w.guard("averaging the gradients", || {
                std::thread::sleep(Duration::from_secs(60));
                Ok(())
            });
            unreachable!("the watchdog let a 60 s wait through a 0.3 s timeout");
        }
        let started = Instant::now();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "dist::watchdog::tests::a_wait_past_the_timeout_ends_the_process_naming_rank_and_wait",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(
                "rank 3: NCCL: averaging the gradients did not finish within the 0.3 s timeout"
            ),
            "{stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
}
