//! Polite stops: `SIGTERM` (Slurm preemption, `kill`, `docker stop`) and `SIGINT` (Ctrl-C) ask a running
//! `sprint-train` or `sprint-prep` to stop at its next safe point — after the training step in flight (which is
//! then checkpointed) or after the rows already encoded are committed — and exit 0. A second signal exits at
//! once with status 128 + signal; that is still safe, because checkpoints and store commits are atomic (a
//! half-written checkpoint is never picked by `latest`, an unfinished commit is never part of the store).
//!
//! The binaries call [`install`]; the library only polls [`requested`], so a library user who never installs
//! the handlers keeps the default signal behaviour.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::{Error, Result};

struct Flags {
    /// Set by the first signal.
    stop: Arc<AtomicBool>,
    /// The number of the last signal received.
    which: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the `SIGTERM` / `SIGINT` handlers (idempotent): the first signal sets the stop request, the second
/// exits the process at once.
pub fn install() -> Result<()> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let flags = Flags {
        stop: Arc::new(AtomicBool::new(false)),
        which: Arc::new(AtomicUsize::new(0)),
    };
    for sig in [SIGTERM, SIGINT] {
        let fail = |e: std::io::Error| {
            Error::Arg(format!("cannot install the {} handler: {e}", name(sig)))
        };
        // order matters: the exit test runs before the flag is set, so only a second signal exits
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&flags.stop))
            .map_err(fail)?;
        signal_hook::flag::register_usize(sig, Arc::clone(&flags.which), sig as usize)
            .map_err(fail)?;
        signal_hook::flag::register(sig, Arc::clone(&flags.stop)).map_err(fail)?;
    }
    let _ = FLAGS.set(flags);
    Ok(())
}

/// The signal that asked for a stop (`"SIGTERM"` or `"SIGINT"`), if one did.
pub fn requested() -> Option<&'static str> {
    let flags = FLAGS.get()?;
    if !flags.stop.load(Ordering::SeqCst) {
        return None;
    }
    Some(name(flags.which.load(Ordering::SeqCst) as i32))
}

fn name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "a signal",
    }
}
