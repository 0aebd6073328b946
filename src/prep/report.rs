//! The run report: what was read, written and skipped (bad rows by reason), written as JSON next to the store.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::source::Shard;
use super::PrepOptions;
use crate::error::{Error, Result};

/// A row that could not be encoded; it produces no store row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRow {
    pub id: String,
    /// A short stable category: `null image`, `null caption`, `invalid caption` (not UTF-8), `empty image
    /// bytes`, `corrupt image`, `truncated image`, `unsupported image format`, `image too large`, `non-finite
    /// latent`, `non-finite prompt embedding` (NaN/Inf from the encoders, or beyond the store's float16),
    /// `unreadable shard` (a corrupt page of its shard: the next run tries the row again).
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// An input file that could not be read: skipped whole (an unreadable footer: its rows are absent and a rerun
/// after fixing it appends them) or from a corrupt page on (its unread rows are bad rows `unreadable shard`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadShard {
    pub path: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepReport {
    pub output: String,
    pub files: Vec<String>,
    /// Rows in all input files.
    pub rows_total: usize,
    /// Rows whose id the store already held before this run (skipped without work).
    pub rows_already_stored: usize,
    pub rows_encoded: usize,
    pub rows_written: usize,
    pub bad_rows_by_reason: BTreeMap<String, usize>,
    pub bad_rows: Vec<BadRow>,
    pub elapsed_s: f64,
    pub rows_per_s: f64,
    /// This worker, `i/n` (1-based), and the parts: all of them, this worker's, and those of this worker's that
    /// other workers finished (an overlapping run).
    #[serde(default)]
    pub worker: String,
    #[serde(default)]
    pub parts_total: usize,
    #[serde(default)]
    pub parts_of_worker: usize,
    #[serde(default)]
    pub parts_done_by_others: usize,
    /// Ids stored more than once, found by the end-of-run check (`sprint-prep --dedupe` removes them).
    #[serde(default)]
    pub duplicate_ids: usize,
    /// This worker was the last to finish and compacted the store's fragments.
    #[serde(default)]
    pub compacted: bool,
    /// `running` while the run works (a report left saying so belongs to a run that was killed), then
    /// `finished`, `stopped by SIGTERM` / `stopped by SIGINT` (a polite stop: what was encoded is committed), or
    /// `failed: <error>`. Empty in reports of older versions.
    #[serde(default)]
    pub status: String,
    /// When the run started (seconds since the Unix epoch).
    #[serde(default)]
    pub started_unix_s: u64,
    /// The process's resident-memory high-water mark at the end of the run (Linux), in MiB.
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// Input files that could not be read (`--strict` refuses them instead).
    #[serde(default)]
    pub bad_shards: Vec<BadShard>,
    /// Input files that hold no rows (nothing to do for them).
    #[serde(default)]
    pub empty_shards: Vec<String>,
}

/// "42 s", "17 min", "3.2 h", "2.1 days".
fn human_duration(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172800 => format!("{:.1} h", secs as f64 / 3600.0),
        _ => format!("{:.1} days", secs as f64 / 86400.0),
    }
}

/// [`PrepReport::status`] of a run in progress.
pub const STATUS_RUNNING: &str = "running";

impl PrepReport {
    pub fn new(opts: &PrepOptions, shards: &[Shard], rows_total: usize, already: usize) -> Self {
        Self {
            output: opts.output.display().to_string(),
            files: shards
                .iter()
                .map(|s| s.path.display().to_string())
                .collect(),
            rows_total,
            rows_already_stored: already,
            rows_encoded: 0,
            rows_written: 0,
            bad_rows_by_reason: BTreeMap::new(),
            bad_rows: Vec::new(),
            elapsed_s: 0.0,
            rows_per_s: 0.0,
            worker: "1/1".into(),
            parts_total: 0,
            parts_of_worker: 0,
            parts_done_by_others: 0,
            duplicate_ids: 0,
            compacted: false,
            status: STATUS_RUNNING.into(),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            bad_shards: Vec::new(),
            empty_shards: Vec::new(),
            peak_rss_mib: None,
        }
    }

    /// Records an unreadable input file once (a shard met again keeps its first error).
    pub fn add_bad_shard(&mut self, bad: BadShard) {
        if !self.bad_shards.iter().any(|b| b.path == bad.path) {
            self.bad_shards.push(bad);
        }
    }

    pub fn add_bad(&mut self, bad: BadRow) {
        *self
            .bad_rows_by_reason
            .entry(bad.reason.clone())
            .or_default() += 1;
        self.bad_rows.push(bad);
    }

    pub fn finish(&mut self, elapsed_s: f64) {
        self.peak_rss_mib = crate::system::proc_status_mib("VmHWM:").map(|m| m.round());
        self.bad_rows.sort_by(|a, b| a.id.cmp(&b.id));
        self.elapsed_s = (elapsed_s * 1000.0).round() / 1000.0;
        let done = self.rows_encoded + self.bad_rows.len();
        self.rows_per_s = if elapsed_s > 0.0 {
            ((done as f64 / elapsed_s) * 100.0).round() / 100.0
        } else {
            0.0
        };
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        if crate::store::location::is_remote(path) {
            // one PUT: an object is replaced whole, never seen half-written
            return crate::store::location::write_whole(path, text.as_bytes());
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    pub fn read(path: &Path) -> Result<Self> {
        if crate::store::location::is_remote(path) {
            let bytes = crate::store::location::read_whole(path)?;
            return Ok(serde_json::from_slice(&bytes)?);
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// How the run the report belongs to ended, in words (`--inspect`).
    pub fn describe_status(&self) -> String {
        let ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(self.started_unix_s);
        let when = if self.started_unix_s == 0 {
            String::new()
        } else {
            format!(", started {} ago", human_duration(ago))
        };
        match self.status.as_str() {
            "" => "finished (a report of an older version)".into(),
            STATUS_RUNNING => format!(
                "did not finish{when}: it was killed (or is still running); rerun the same command to continue"
            ),
            other => format!("{other}{when}"),
        }
    }

    /// The human summary printed at the end of a run.
    pub fn summary(&self, report_path: &Path) -> String {
        let mut s = format!(
            "{} input rows in {} file(s): {} already stored, {} encoded, {} written, {} skipped; {:.1} s ({:.2} rows/s)\nstore: {}\nreport: {}",
            self.rows_total,
            self.files.len(),
            self.rows_already_stored,
            self.rows_encoded,
            self.rows_written,
            self.bad_rows.len(),
            self.elapsed_s,
            self.rows_per_s,
            self.output,
            report_path.display()
        );
        if self.status.starts_with("stopped") {
            s.push_str(&format!(
                "\n{}: the rows encoded so far are committed; rerun the same command to continue",
                self.status
            ));
        }
        if self.worker != "1/1" && !self.worker.is_empty() {
            s.push_str(&format!(
                "\nworker {}: {} of {} part(s){}",
                self.worker,
                self.parts_of_worker,
                self.parts_total,
                if self.parts_done_by_others > 0 {
                    format!(", {} finished by other workers", self.parts_done_by_others)
                } else {
                    String::new()
                }
            ));
        }
        if self.duplicate_ids > 0 {
            s.push_str(&format!(
                "\nWARNING: {} id(s) are stored more than once (written by an older version or by hand?); \
                 `sprint-prep --dedupe {}` removes the extra copies",
                self.duplicate_ids, self.output
            ));
        }
        if !self.bad_shards.is_empty() {
            s.push_str(&format!(
                "\nWARNING: {} input file(s) could not be read, whole or in part (a rerun encodes the rows \
                 missing once the files are fixed; --strict makes this an error):",
                self.bad_shards.len()
            ));
            for b in &self.bad_shards {
                s.push_str(&format!("\n  {}: {}", b.path, b.error));
            }
        }
        if !self.empty_shards.is_empty() {
            s.push_str(&format!(
                "\n{} input file(s) hold no rows: {}",
                self.empty_shards.len(),
                self.empty_shards.join(", ")
            ));
        }
        for (reason, n) in &self.bad_rows_by_reason {
            s.push_str(&format!("\n  skipped ({reason}): {n}"));
        }
        for b in self.bad_rows.iter().take(10) {
            s.push_str(&format!(
                "\n    {}: {}{}",
                b.id,
                b.reason,
                if b.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", b.detail)
                }
            ));
        }
        if self.bad_rows.len() > 10 {
            s.push_str(&format!(
                "\n    … {} more in the report",
                self.bad_rows.len() - 10
            ));
        }
        s
    }
}
