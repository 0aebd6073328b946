//! The command lines of `sprint-prep` and `sprint-train`: clap arguments that hold `Option<T>` for every
//! tunable and fill the gaps from the library options ([`crate::prep::PrepOptions`],
//! [`crate::train::options::TrainOptions`]), which are the one place each default is written. `--help` shows
//! those library values, and the README's flag tables are checked against [`shown_defaults`] by a test.

pub mod prep;
pub mod train;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command, FromArgMatches, ValueEnum};

/// What `--device` defaults to, in words (the value is [`crate::device::default_device`]).
pub const DEVICE_DEFAULT: &str = "cuda in CUDA builds, else cpu";

/// The `datasets/` folder used by `--demo`: next to the working directory, else the one this crate was built
/// from.
pub fn datasets_dir() -> PathBuf {
    let local = PathBuf::from("datasets");
    if local.join("tiny-sana-sprint").is_dir() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets")
    }
}

/// A number as the README and `--help` write it (`1e-4` rather than `0.0001`).
fn num(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// A list of numbers, space separated (as they are passed on the command line).
fn nums<T: Copy + Into<f64>>(xs: &[T]) -> String {
    xs.iter()
        .map(|&x| num(x.into()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command-line spelling of a value enum.
fn value_name<E: ValueEnum>(e: &E) -> String {
    e.to_possible_value()
        .expect("no skipped variants")
        .get_name()
        .to_string()
}

/// Appends `[default: …]` (the library value) to the help of each tunable.
fn with_defaults(mut cmd: Command, tunables: &[(&'static str, String)]) -> Command {
    for (id, shown) in tunables {
        cmd = cmd.mut_arg(*id, |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            let sep = if help.is_empty() { "" } else { " " };
            a.help(format!("{help}{sep}[default: {shown}]"))
        });
    }
    cmd
}

/// Every long flag of `cmd` (without `--`) with the default a user sees: the library value for tunables,
/// `off` for switches, `required` for the listed required flags, `–` for flags that default to nothing.
fn defaults_of(
    cmd: &Command,
    tunables: &[(&'static str, String)],
    required: &[&str],
) -> Vec<(String, String)> {
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            if matches!(long, "help" | "version") {
                return None;
            }
            let id = a.get_id().as_str();
            let shown = if let Some((_, d)) = tunables.iter().find(|(t, _)| *t == id) {
                d.clone()
            } else if matches!(a.get_action(), ArgAction::SetTrue) {
                "off".to_string()
            } else if required.contains(&id) {
                "required".to_string()
            } else {
                "–".to_string()
            };
            Some((long.to_string(), shown))
        })
        .collect()
}

/// What both binaries' argument types share: their clap command (with the library defaults in the help) and
/// parsing through it.
pub trait CliArgs: FromArgMatches + Sized {
    /// The clap command, with each tunable's library default in its help.
    fn command() -> Command;

    /// Parses the process's arguments; prints the error or help and exits on bad input.
    fn parse_args() -> Self {
        Self::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (program name first).
    fn try_parse_args<I, S>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString> + Clone,
    {
        let mut cmd = Self::command();
        let matches = cmd.try_get_matches_from_mut(args)?;
        Self::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
    }
}

/// Every long flag of `binary` (`sprint-prep` or `sprint-train`) with the default its `--help` shows (see
/// [`prep::shown_defaults`], [`train::shown_defaults`]).
pub fn shown_defaults(binary: &str) -> Option<Vec<(String, String)>> {
    match binary {
        "sprint-prep" => Some(prep::shown_defaults()),
        "sprint-train" => Some(train::shown_defaults()),
        _ => None,
    }
}

/// Sets `slot` to the library `default` unless the user gave a value, and returns the value in effect.
fn fill<T: Clone>(slot: &mut Option<T>, default: &T) -> T {
    slot.get_or_insert_with(|| default.clone()).clone()
}

/// The binaries' log output: warnings and errors on stderr (`RUST_LOG` selects more), coloured only when
/// stderr is a terminal (a log file gets no ANSI codes).
pub fn init_logging() {
    init_logging_with("warn");
}

/// [`init_logging`] with another filter when `RUST_LOG` is not set.
pub fn init_logging_with(default_filter: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// The progress bar of a job over `total` rows (`unit` names them: "rows", "rows verified"), hidden when
/// `enabled` is false; `{msg}` carries the job's notes (e.g. rows skipped).
pub fn rows_bar(total: u64, enabled: bool, unit: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    let template =
        format!("{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}  {{msg}}");
    pb.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// Writes one line to stdout; when the reader has gone (`sprint-prep --inspect STORE | head`), the process
/// ends quietly with status 0 instead of panicking as `println!` does on a broken pipe.
pub fn print_line(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(2);
        }
    }
}

/// `println!` for the binaries, through [`print_line`] (no panic on a closed pipe).
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::print_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::cli::print_line(format_args!($($arg)*)) };
}
