//! TensorBoard event files, written directly: the TFRecord framing, CRC-32C and the handful of protobuf fields
//! that scalars and images need, encoded by hand (no TensorFlow, no protobuf crate).
//!
//! ```no_run
//! # fn main() -> sana_sprint::Result<()> {
//! use sana_sprint::tensorboard::EventWriter;
//! let mut tb = EventWriter::create(std::path::Path::new("out/tensorboard"))?;
//! tb.add_scalar("scm_loss", 10, 0.25, 1.7e9)?;
//! let line = serde_json::json!({"step": 10, "lr": 1e-4, "stages": {"forward": 0.5}});
//! tb.add_scalars_from_json(10, 1.7e9, &line)?; // tags "lr" and "stages/forward"
//! tb.flush()?;
//! # Ok(()) }
//! ```
//!
//! # Format
//!
//! An event file is a sequence of TFRecords: the data's length as a little-endian u64, the masked CRC-32C of
//! those 8 bytes, the data, the masked CRC-32C of the data. CRC-32C is the Castagnoli CRC (reflected polynomial
//! `0x82F63B78`); masking is `((crc >> 15) | (crc << 17)) + 0xa282ead8`, wrapping. Each record holds one
//! serialised `tensorboard.Event` (tensorboard/compat/proto/event.proto and summary.proto):
//!
//! | message          | fields written here                                                           |
//! |------------------|-------------------------------------------------------------------------------|
//! | `Event`          | 1 `wall_time` double, 2 `step` int64, 3 `file_version` string, 5 `summary`, 7 `session_log` |
//! | `Summary`        | 1 `value` (repeated `Value`)                                                  |
//! | `Summary.Value`  | 1 `tag` string, 2 `simple_value` float, 4 `image` (`Image`)                    |
//! | `Summary.Image`  | 1 `height`, 2 `width`, 3 `colorspace` (int32), 4 `encoded_image_string` bytes  |
//! | `SessionLog`     | 1 `status` enum (`START` = 1)                                                 |
//!
//! (`session_log` is field 7; field 6 is the deprecated `log_message`.) The encoding is proto3's canonical one,
//! byte for byte what TensorBoard's Python writer produces for the same event (the unit tests compare against
//! bytes it wrote): zero `wall_time`/`step`/image sizes are left out, while `simple_value` and the `what` members
//! are in oneofs and always written, zero included. Scalars are `simple_value`s, so they are stored as f32.
//!
//! The first record of every file is an `Event` with `file_version = "brain.Event:2"`. Files are named
//! `events.out.tfevents.{unix_secs}.{hostname}.{pid}.sana-sprint` as TensorBoard's own writers name them
//! (seconds zero-padded to 10 digits, so names sort by creation time; a name already taken, e.g. a second writer
//! in the same second, takes the next free second).
//!
//! # Restarted and resumed runs
//!
//! [`EventWriter::create`] always starts a new file; TensorBoard reads every event file in a directory, in name
//! (= creation) order, as one run. A run resumed from a checkpoint at step N therefore leaves the steps N+1..
//! that the interrupted run had logged after the checkpoint in the older file, and logs them again in the new
//! one. What a reader makes of that duplicate range:
//!
//! - TensorBoard's UI (the Rust data server, `tensorboard --logdir`'s default loader since 2.5 when the
//!   `tensorboard-data-server` package is present, as it is with pip's `tensorboard`) preempts per tag: a
//!   point at step s discards the points of that tag at steps ≥ s read before it. The newest file wins and the
//!   re-logged steps are shown once, with the resumed run's values.
//! - The Python loader (`tensorboard --load_fast=false`, `EventAccumulator`, tools built on it) keeps both
//!   copies of the duplicate steps, unless the new file starts with a `SessionLog` `START` event: for
//!   `brain.Event:2` files it then purges every event with step ≥ the `START` event's step read before it
//!   (`purge_orphaned_data`, on by default). [`EventWriter::start_session`] writes that event: call it right
//!   after `create` with the first step the run will log (checkpoint step + 1 on resume, 0 for a fresh run,
//!   which hides everything an earlier run left in the directory). The integration test
//!   (tests/suite/tensorboard.rs) checks this with the `tensorboard` Python package.
//! - Any reader at all sees one copy if the older files are cut back first: [`purge_after`] rewrites every event
//!   file in a directory without the events after a step. Call it before `create`, while nothing writes there.
//!
//! Writes are buffered: call [`EventWriter::flush`] after each batch of events (TensorBoard sees nothing until
//! then) and before dropping the writer to see write errors; dropping flushes too, but can only log a failure.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Error, Result};

/// The `file_version` of the first event of every file (TensorBoard's purge logic keys on version 2).
pub const FILE_VERSION: &str = "brain.Event:2";

/// The Castagnoli polynomial, bit-reversed.
const CASTAGNOLI: u32 = 0x82F6_3B78;

/// CRC-32C of every byte value, for the byte-at-a-time loop.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ CASTAGNOLI
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli) of `data`: `crc32c(b"123456789") == 0xE306_9283`.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// The masked CRC-32C that TFRecords store: `((crc >> 15) | (crc << 17)) + 0xa282ead8`, wrapping.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, u64::from(field) << 3 | u64::from(wire));
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// An int32/int64 field (negative values take 10 bytes, as protobuf's sign extension to 64 bits does).
fn put_int(buf: &mut Vec<u8>, field: u32, v: i64) {
    put_key(buf, field, VARINT);
    put_varint(buf, v as u64);
}

/// The start of an `Event`: `wall_time` (1) and `step` (2), left out when zero as proto3 does.
fn event_head(wall_time: f64, step: i64) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    if wall_time.to_bits() != 0 {
        put_key(&mut ev, 1, I64);
        ev.extend_from_slice(&wall_time.to_le_bytes());
    }
    if step != 0 {
        put_int(&mut ev, 2, step);
    }
    ev
}

/// A `Summary.Value` (its fields, without the enclosing key) holding a `simple_value` (2).
fn scalar_value(tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + 8);
    put_bytes(&mut v, 1, tag.as_bytes());
    put_key(&mut v, 2, I32);
    v.extend_from_slice(&value.to_le_bytes());
    v
}

/// An `Event` with a `Summary` (5) of the given encoded `Summary.Value`s (each `Summary.value`, field 1).
fn summary_event(wall_time: f64, step: i64, values: &[Vec<u8>]) -> Vec<u8> {
    let mut summary = Vec::new();
    for v in values {
        put_bytes(&mut summary, 1, v);
    }
    let mut ev = event_head(wall_time, step);
    put_bytes(&mut ev, 5, &summary);
    ev
}

/// A `Summary.Value` holding an `image` (4).
fn image_value(tag: &str, height: u32, width: u32, colorspace: i64, encoded: &[u8]) -> Vec<u8> {
    let mut image = Vec::with_capacity(encoded.len() + 16);
    if height != 0 {
        put_int(&mut image, 1, i64::from(height));
    }
    if width != 0 {
        put_int(&mut image, 2, i64::from(width));
    }
    put_int(&mut image, 3, colorspace);
    put_bytes(&mut image, 4, encoded);
    let mut value = Vec::with_capacity(image.len() + tag.len() + 8);
    put_bytes(&mut value, 1, tag.as_bytes());
    put_bytes(&mut value, 4, &image);
    value
}

/// Width, height and `Summary.Image.colorspace` of a PNG, from its IHDR chunk.
fn png_header(png: &[u8]) -> Option<(u32, u32, i64)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if png.len() < 33 || &png[..8] != SIGNATURE || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    // PNG colour types -> colorspace: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA (palette images count as RGB)
    let colorspace = match png[25] {
        0 => 1,
        4 => 2,
        2 | 3 => 3,
        6 => 4,
        _ => return None,
    };
    Some((be(16), be(20), colorspace))
}

/// Writes one TensorBoard event file (see the [module docs](self)).
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` (and its parents) if needed and starts a new event file in it, whose first event carries
    /// the [`FILE_VERSION`]. The file is flushed at once, so it exists with a valid first record on return.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let host: String = host_name()
            .chars()
            .map(|c| {
                if c == '/' || c.is_whitespace() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let pid = std::process::id();
        let mut secs = now.as_secs();
        let (file, path) = loop {
            let path = dir.join(format!(
                "events.out.tfevents.{secs:010}.{host}.{pid}.sana-sprint"
            ));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => secs += 1,
                Err(e) => return Err(Error::io(path, e)),
            }
        };
        let mut writer = EventWriter {
            out: BufWriter::new(file),
            path,
        };
        let mut ev = event_head(now.as_secs_f64(), 0);
        put_bytes(&mut ev, 3, FILE_VERSION.as_bytes());
        writer.write_record(&ev)?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a `SessionLog` `START` event at `first_step`: TensorBoard's Python loader then drops every event
    /// at a step ≥ `first_step` from the files before this one (see the module docs). Call it once, right after
    /// [`create`](Self::create), with the first step this run will log.
    pub fn start_session(&mut self, first_step: i64, wall_time: f64) -> Result<()> {
        let mut session_log = Vec::new();
        put_int(&mut session_log, 1, 1); // status = START
        let mut ev = event_head(wall_time, first_step);
        put_bytes(&mut ev, 7, &session_log);
        self.write_record(&ev)
    }

    /// Writes one scalar (stored as an f32 `simple_value`, as all TensorBoard scalars of this kind are).
    pub fn add_scalar(&mut self, tag: &str, step: i64, value: f64, wall_time: f64) -> Result<()> {
        let ev = summary_event(wall_time, step, &[scalar_value(tag, value as f32)]);
        self.write_record(&ev)
    }

    /// Writes every number of a `metrics.jsonl` object as a scalar at `step`, all in one event: a field `"lr"` as
    /// tag `lr`, nested objects as `parent/child` (`{"stages": {"forward": 0.5}}` as `stages/forward`). The
    /// top-level `"step"` is left out (it is the x axis), and so are strings, booleans, nulls and arrays.
    /// Returns how many scalars it wrote (nothing is written for none). A `line` that is not an object is an
    /// [`Error::Arg`].
    pub fn add_scalars_from_json(
        &mut self,
        step: i64,
        wall_time: f64,
        line: &serde_json::Value,
    ) -> Result<usize> {
        fn walk(
            prefix: &str,
            obj: &serde_json::Map<String, serde_json::Value>,
            out: &mut Vec<Vec<u8>>,
        ) {
            for (key, v) in obj {
                if prefix.is_empty() && key == "step" {
                    continue;
                }
                let tag = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}/{key}")
                };
                match v {
                    serde_json::Value::Number(n) => {
                        if let Some(x) = n.as_f64() {
                            out.push(scalar_value(&tag, x as f32));
                        }
                    }
                    serde_json::Value::Object(inner) => walk(&tag, inner, out),
                    _ => {}
                }
            }
        }
        let serde_json::Value::Object(obj) = line else {
            return Err(Error::Arg(format!(
                "TensorBoard scalars from JSON: expected an object, got {line}"
            )));
        };
        let mut values = Vec::new();
        walk("", obj, &mut values);
        if !values.is_empty() {
            self.write_record(&summary_event(wall_time, step, &values))?;
        }
        Ok(values.len())
    }

    /// Writes a PNG image (the encoded file, as TensorBoard's image dashboard shows it). `height` and `width`
    /// must be the PNG's own; the colour space is read from the PNG. Bytes that are not a PNG, or sizes that
    /// disagree with it, are an [`Error::Arg`].
    pub fn add_png(
        &mut self,
        tag: &str,
        step: i64,
        png_bytes: &[u8],
        height: u32,
        width: u32,
        wall_time: f64,
    ) -> Result<()> {
        let Some((w, h, colorspace)) = png_header(png_bytes) else {
            return Err(Error::Arg(format!(
                "TensorBoard image {tag:?}: the bytes are not a PNG"
            )));
        };
        if (w, h) != (width, height) {
            return Err(Error::Arg(format!(
                "TensorBoard image {tag:?}: given {width}x{height}, but the PNG is {w}x{h}"
            )));
        }
        let value = image_value(tag, height, width, colorspace, png_bytes);
        self.write_record(&summary_event(wall_time, step, &[value]))
    }

    /// Writes out everything buffered (not an fsync).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// Frames `data` as one TFRecord.
    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut write = || -> std::io::Result<()> {
            self.out.write_all(&len)?;
            self.out.write_all(&masked_crc32c(&len).to_le_bytes())?;
            self.out.write_all(data)?;
            self.out.write_all(&masked_crc32c(data).to_le_bytes())
        };
        write().map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::warn!("TensorBoard events {}: {e}", self.path.display());
        }
    }
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("path", &self.path)
            .finish()
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

/// The records of an event file, CRCs checked. A record cut short at the end of the file (what a crash while
/// writing leaves) ends the list; the bool says whether there was one.
fn read_records(path: &Path, bytes: &[u8]) -> Result<(Vec<(usize, usize)>, bool)> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes.len() - at < 12 {
            return Ok((records, true));
        }
        let len_bytes = &bytes[at..at + 8];
        let stored = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        if masked_crc32c(len_bytes) != stored {
            return Err(Error::data(
                path,
                format!("TFRecord at byte {at}: the length's CRC does not match"),
            ));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap());
        let start = at + 12;
        if len > (bytes.len() - start) as u64 || bytes.len() - start - (len as usize) < 4 {
            return Ok((records, true));
        }
        let end = start + len as usize;
        let stored = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap());
        if masked_crc32c(&bytes[start..end]) != stored {
            return Err(Error::data(
                path,
                format!("TFRecord at byte {at}: the data's CRC does not match"),
            ));
        }
        records.push((at, end + 4));
        at = end + 4;
    }
    Ok((records, false))
}

fn get_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `step` of a serialised `Event` (0 when absent), or `None` if it is not valid protobuf.
fn event_step(ev: &[u8]) -> Option<i64> {
    let (mut at, mut step) = (0, 0);
    while at < ev.len() {
        let key = get_varint(ev, &mut at)?;
        match (key >> 3, (key & 7) as u8) {
            (2, VARINT) => step = get_varint(ev, &mut at)? as i64,
            (_, VARINT) => {
                get_varint(ev, &mut at)?;
            }
            (_, I64) => at += 8,
            (_, I32) => at += 4,
            (_, LEN) => at += usize::try_from(get_varint(ev, &mut at)?).ok()?,
            _ => return None,
        }
    }
    (at == ev.len()).then_some(step)
}

/// Rewrites every event file in `dir` (every file whose name contains `tfevents`, as TensorBoard picks them)
/// without its events at steps greater than `step`, so that a run resumed from a checkpoint at `step` logs the
/// later steps only once, for any reader. Files with nothing to drop are left alone; a record cut short at the
/// end of a file is dropped too. A missing `dir` has nothing to purge. Returns the number of events dropped.
///
/// Run it before [`EventWriter::create`], while nothing writes to `dir`; a TensorBoard already showing the run
/// keeps the points it has read until it is restarted. A file with a bad CRC or an undecodable event is an
/// [`Error::Data`] and stays as it was.
pub fn purge_after(dir: &Path, step: i64) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let is_file = entry
            .file_type()
            .map_err(|e| Error::io(entry.path(), e))?
            .is_file();
        if is_file && entry.file_name().to_string_lossy().contains("tfevents") {
            files.push(entry.path());
        }
    }
    files.sort();
    let mut dropped = 0;
    for path in files {
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let (records, cut_short) = read_records(&path, &bytes)?;
        let mut kept = Vec::with_capacity(bytes.len());
        let mut file_dropped = 0;
        for (start, end) in records {
            let ev = &bytes[start + 12..end - 4];
            let ev_step = event_step(ev).ok_or_else(|| {
                Error::data(&path, format!("the record at byte {start} is not an Event"))
            })?;
            if ev_step > step {
                file_dropped += 1;
            } else {
                kept.extend_from_slice(&bytes[start..end]);
            }
        }
        if file_dropped == 0 && !cut_short {
            continue;
        }
        // the temporary name lacks "tfevents", so TensorBoard never reads it
        let tmp = dir.join(format!(".sana-sprint-purge.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&kept)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        dropped += file_dropped;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Frames one record as `EventWriter` does, into memory.
    fn record(data: &[u8]) -> Vec<u8> {
        let len = (data.len() as u64).to_le_bytes();
        let mut r = len.to_vec();
        r.extend(masked_crc32c(&len).to_le_bytes());
        r.extend(data);
        r.extend(masked_crc32c(data).to_le_bytes());
        r
    }

    #[test]
    fn tensorboard_crc32c_matches_known_vectors() {
        // RFC 3720 (iSCSI) B.4 vectors and the common check value
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let up: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&up), 0x46DD_794E);
        let down: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&down), 0x113F_DB5C);
    }

    #[test]
    #[allow(clippy::manual_rotate)] // the mask spelled as TFRecord's docs write it
    fn tensorboard_masked_crc32c_matches_tensorboards_python() {
        // tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c (tensorboard 2.21.0)
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(&[0u8; 32]), 0x0fd7_fffa);
        assert_eq!(masked_crc32c(&[0xffu8; 32]), 0xf909_b029);
        let up: Vec<u8> = (0..32).collect();
        assert_eq!(masked_crc32c(&up), 0x951f_7892);
        // the formula itself, wrapping
        let c = crc32c(b"123456789");
        assert_eq!(
            masked_crc32c(b"123456789"),
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        );
    }

    // Golden bytes: `event_pb2.Event(...).SerializeToString()` and tensorboard.summary.writer.record_writer's
    // framing of it, from tensorboard 2.21.0's Python package.

    #[test]
    fn tensorboard_events_encode_as_tensorboards_python_does() {
        let mut fv = event_head(1700000000.25, 0);
        put_bytes(&mut fv, 3, FILE_VERSION.as_bytes());
        assert_eq!(
            fv,
            unhex("0900001040fc54d9411a0d627261696e2e4576656e743a32")
        );
        assert_eq!(
            record(&fv),
            unhex(
                "1800000000000000a37f4b220900001040fc54d9411a0d627261696e2e4576656e743a32338d2fe9"
            )
        );

        let scalars = summary_event(
            1700000000.5,
            7,
            &[scalar_value("loss", 0.5), scalar_value("zero", 0.0)],
        );
        assert_eq!(
            scalars,
            unhex("0900002040fc54d94110072a1a0a0b0a046c6f7373150000003f0a0b0a047a65726f1500000000")
        );
        assert_eq!(
            record(&scalars),
            unhex(
                "2700000000000000bbe1b1460900002040fc54d94110072a1a0a0b0a046c6f7373150000003f\
                 0a0b0a047a65726f15000000000a7f5175"
            )
        );

        let negative = summary_event(1.0, -3, &[scalar_value("a", -1.25)]);
        assert_eq!(
            negative,
            unhex("09000000000000f03f10fdffffffffffffffff012a0a0a080a0161150000a0bf")
        );
    }

    #[test]
    fn tensorboard_session_start_and_image_encode_as_tensorboards_python_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.start_session(101, 2.0).unwrap();
        // a 3x2 RGB PNG header is all png_header reads; the rest of the bytes ride along unchanged
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(3u32.to_be_bytes());
        png.extend(2u32.to_be_bytes());
        png.extend([8, 2, 0, 0, 0, 1, 2, 3, 4]);
        w.add_png("s/x", 4, &png, 2, 3, 3.0).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let bytes = std::fs::read(&path).unwrap();
        let (records, cut_short) = read_records(&path, &bytes).unwrap();
        assert!(!cut_short);
        assert_eq!(records.len(), 3);
        let data = |i: usize| &bytes[records[i].0 + 12..records[i].1 - 4];
        assert_eq!(data(1), unhex("09000000000000004010653a020801"));
        assert_eq!(
            &bytes[records[1].0..records[1].1],
            unhex("0f000000000000006d532b0909000000000000004010653a020801272a1bcc")
        );
        assert_eq!(
            data(2),
            summary_event(3.0, 4, &[image_value("s/x", 2, 3, 3, &png)])
        );
        // Python: Summary.Image(height=2, width=3, colorspace=3, encoded_image_string=b"PNGDATA") under tag s/x
        let image = summary_event(3.0, 4, &[image_value("s/x", 2, 3, 3, b"PNGDATA")]);
        assert_eq!(
            record(&image),
            unhex(
                "2500000000000000eabc36f309000000000000084010042a180a160a03732f78220f0802100318\
                 032207504e4744415441116cbf34"
            )
        );
        assert_eq!(event_step(data(2)), Some(4));
        assert_eq!(event_step(data(1)), Some(101));
        assert_eq!(event_step(data(0)), Some(0));
    }

    #[test]
    fn tensorboard_json_lines_become_nested_tags_and_refusals_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        let line = serde_json::json!({
            "step": 3, "phase": "G", "lr": 0.5, "scm_loss": null, "ok": true, "shape": [1, 2],
            "stages": {"forward": 1.5, "deep": {"x": 2}},
        });
        assert_eq!(w.add_scalars_from_json(3, 1.0, &line).unwrap(), 3);
        assert_eq!(
            w.add_scalars_from_json(4, 1.0, &serde_json::json!({"step": 4}))
                .unwrap(),
            0
        );
        let e = w
            .add_scalars_from_json(4, 1.0, &serde_json::json!([1]))
            .unwrap_err();
        assert!(e.to_string().contains("expected an object"), "{e}");
        let e = w.add_png("img", 1, b"not a png", 1, 1, 1.0).unwrap_err();
        assert!(e.to_string().contains("not a PNG"), "{e}");
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let (records, _) = read_records(w.path(), &bytes).unwrap();
        assert_eq!(records.len(), 2); // file_version + the one line with numbers
        let ev = &bytes[records[1].0 + 12..records[1].1 - 4];
        let want = summary_event(
            1.0,
            3,
            &[
                scalar_value("lr", 0.5),
                scalar_value("stages/deep/x", 2.0),
                scalar_value("stages/forward", 1.5),
            ],
        );
        assert_eq!(ev, want); // serde_json's map is sorted by key
    }

    #[test]
    fn tensorboard_writers_in_one_second_get_distinct_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path() < b.path(), "{:?} !< {:?}", a.path(), b.path());
        let name = b.path().file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(
            name.ends_with(&format!(".{}.sana-sprint", std::process::id())),
            "{name}"
        );
    }

    #[test]
    fn tensorboard_purge_after_drops_later_steps_and_a_cut_short_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let mut w = EventWriter::create(dir.path()).unwrap();
            for step in 1..=5 {
                w.add_scalar("loss", step, step as f64, 1.0).unwrap();
            }
            w.path().to_path_buf()
        };
        // a crash mid-record
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(&record(&summary_event(1.0, 6, &[scalar_value("loss", 6.0)]))[..20]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(purge_after(dir.path(), 3).unwrap(), 2);
        let bytes = std::fs::read(&path).unwrap();
        let (records, cut_short) = read_records(&path, &bytes).unwrap();
        assert!(!cut_short);
        let steps: Vec<_> = records
            .iter()
            .map(|&(s, e)| event_step(&bytes[s + 12..e - 4]).unwrap())
            .collect();
        assert_eq!(steps, [0, 1, 2, 3]);
        assert_eq!(purge_after(dir.path(), 3).unwrap(), 0);
        assert_eq!(purge_after(&dir.path().join("absent"), 3).unwrap(), 0);
        // a corrupt file is refused, named, and left alone
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = purge_after(dir.path(), 1).unwrap_err().to_string();
        assert!(
            e.contains(&*path.to_string_lossy()) && e.contains("CRC"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bad);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }
}
