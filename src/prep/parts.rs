//! Many sprint-prep workers on one store: which rows each worker encodes (parts), the leases that keep two
//! workers off the same part, and the identity of each input shard.
//!
//! **Parts.** Every shard is cut into blocks of `--part_rows` rows; the parts of all shards, in input order,
//! go round-robin to the workers (part i to worker i mod N). Part keys (`<shard>#<first row>-<last row>`)
//! depend only on the shard and the part size, not on the number of workers, so a rerun — with the same or a
//! different number of workers — leases exactly the same parts.
//!
//! **Leases** live in the store folder, `_sprint/leases/<part>.json` (docs/STORE.md). A worker creates a
//! part's lease atomically (a fully written temporary file hard-linked to the lease name, which fails when the
//! name exists), renews it every third of `--lease_seconds` while it works, and marks it `done` once every
//! row of the part is committed. A lease whose owner stopped renewing expires and is taken over (renamed away
//! atomically, so only one worker wins); a live lease makes the other worker do its remaining parts first,
//! then wait with a message naming the owner. Leases decide who works; the store's ids decide what is left:
//! a worker never appends an id that is stored, and re-reads the stored ids of a part it takes over.
//!
//! **Shard identity.** `_sprint/shards/<name>.json` records each input file's size and the SHA-256 of its
//! parquet footer (schema, row groups and their statistics: an edited or different file changes it). A known
//! name with other content is refused, or stored under `<name>@<first 8 hex digits of the hash>` row ids with
//! `--distinct_shard_ids`; unchanged shards keep their `<name>#<row>` ids.

use std::collections::HashSet;
use std::io::{Read as _, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::source::Shard;
use crate::error::{Error, Result};
use crate::store::location::{Files, Read};

/// The folder inside the store that holds leases and shard identities.
pub const SPRINT_DIR: &str = "_sprint";

/// This process's place among the prep workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    pub index: usize,
    pub count: usize,
}

impl Worker {
    pub const SINGLE: Worker = Worker { index: 0, count: 1 };

    /// `--worker_index`/`--worker_count` when given, else the torchrun or Slurm variables (RANK/WORLD_SIZE,
    /// SLURM_PROCID/SLURM_NTASKS), else a single worker. Returns the local rank too (for `cuda` → `cuda:N`).
    pub fn resolve(index: Option<usize>, count: Option<usize>) -> Result<(Worker, usize)> {
        match (index, count) {
            (Some(index), Some(count)) => {
                if count == 0 || index >= count {
                    return Err(Error::Arg(format!(
                        "--worker_index {index} --worker_count {count}: the index must be below the count"
                    )));
                }
                Ok((Worker { index, count }, 0))
            }
            (None, None) => Ok(match launch_vars()? {
                Some((index, count, local)) => (Worker { index, count }, local),
                None => (Worker::SINGLE, 0),
            }),
            _ => Err(Error::Arg(
                "--worker_index and --worker_count go together".into(),
            )),
        }
    }
}

/// (rank, world size, local rank) from torchrun's or Slurm's variables. Prep needs no rendezvous, so only these
/// are read (a Slurm array job passes --worker_index/--worker_count instead).
fn launch_vars() -> Result<Option<(usize, usize, usize)>> {
    let get = |k: &str| std::env::var(k).ok();
    let num = |k: &str, v: String| {
        v.trim().parse::<usize>().map_err(|_| {
            Error::Arg(format!(
                "{k}={v:?} is not a number (set by torchrun or Slurm)"
            ))
        })
    };
    for (rank, world, local) in [
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ] {
        if let (Some(r), Some(w)) = (get(rank), get(world)) {
            let (r, w) = (num(rank, r)?, num(world, w)?);
            let l = get(local).map(|v| num(local, v)).transpose()?.unwrap_or(0);
            if w == 0 || r >= w {
                return Err(Error::Arg(format!(
                    "{rank}={r} {world}={w}: the rank must be below the world size"
                )));
            }
            return Ok(Some((r, w, l)));
        }
    }
    Ok(None)
}

/// A block of consecutive rows of one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub key: String,
    /// Index into the shard list.
    pub shard: usize,
    pub start: usize,
    pub len: usize,
}

/// Every shard cut into blocks of `part_rows` rows, shards in input order.
pub fn plan_parts(shards: &[Shard], part_rows: usize) -> Vec<Part> {
    let part_rows = part_rows.max(1);
    let mut parts = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        let mut start = 0;
        while start < s.num_rows {
            let len = part_rows.min(s.num_rows - start);
            parts.push(Part {
                key: format!("{}#{}-{}", s.name, start, start + len - 1),
                shard: i,
                start,
                len,
            });
            start += len;
        }
    }
    parts
}

/// The parts of `worker`: every `count`-th part starting at its index.
pub fn parts_of(parts: &[Part], worker: Worker) -> Vec<Part> {
    parts
        .iter()
        .enumerate()
        .filter(|(i, _)| i % worker.count == worker.index)
        .map(|(_, p)| p.clone())
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// A file name for a part key (`/` and other odd characters replaced).
fn file_stem(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-#@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether a lease is being worked on or finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Running,
    Done,
}

/// The content of a lease file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub part: String,
    /// `host:pid:nonce` of the worker.
    pub owner: String,
    pub worker: String,
    pub state: LeaseState,
    pub renewed_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// Rows of the part this worker had to encode when it took the part, and how many it has done.
    pub rows_todo: usize,
    pub rows_done: usize,
    pub rows_in_part: usize,
}

impl LeaseInfo {
    pub fn expired(&self) -> bool {
        self.state == LeaseState::Running && now_ms() > self.expires_unix_ms
    }

    /// Expired, or held by a process of this machine that no longer exists (a killed worker rerun on the same
    /// machine need not wait for its old lease to expire).
    pub fn abandoned(&self) -> bool {
        if self.state != LeaseState::Running {
            return false;
        }
        if self.expired() {
            return true;
        }
        let mut it = self.owner.rsplitn(3, ':');
        let (_nonce, pid, host) = (it.next(), it.next(), it.next());
        let proc_fs = Path::new("/proc/self").exists();
        match (host, pid.and_then(|p| p.parse::<u32>().ok())) {
            (Some(host), Some(pid)) if proc_fs && host == host_name() => {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            }
            _ => false,
        }
    }

    /// "host:pid (worker 2/3), renewed 4 s ago" for messages.
    pub fn describe(&self) -> String {
        let ago = now_ms().saturating_sub(self.renewed_unix_ms) as f64 / 1000.0;
        let left = self.expires_unix_ms as f64 / 1000.0 - now_ms() as f64 / 1000.0;
        let owner = self.owner.rsplit_once(':').map_or(&*self.owner, |(o, _)| o);
        format!(
            "{owner} ({}), renewed {ago:.0} s ago, expires in {:.0} s",
            self.worker,
            left.max(0.0)
        )
    }
}

/// What [`Leases::try_acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// The part is ours; `taken_over` when the expired lease of another worker (or of a dead process on this
    /// machine) was replaced (its rows may be partly stored: re-read the ids).
    Ours { taken_over: bool },
    /// Another worker finished it.
    Done(LeaseInfo),
    /// Another worker holds it and renews it.
    Held(LeaseInfo),
}

/// This worker's leases in one store: acquisition, renewal by a heartbeat thread, completion. The lease files
/// live in `_sprint/leases/` of the store, on a local folder or an object store (see [`Files`] for how each
/// write is made atomic there).
pub struct Leases {
    files: Files,
    owner: String,
    worker: String,
    ttl: Duration,
    held: Arc<Mutex<Vec<LeaseInfo>>>,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

const LEASES: &str = "_sprint/leases";

fn lease_rel(key: &str) -> String {
    format!("{LEASES}/{}.json", file_stem(key))
}

impl Leases {
    /// The leases of the store at `store` (a folder or a URI), for `worker` with leases of `ttl`.
    pub fn new(store: &Path, worker: Worker, ttl: Duration) -> Result<Leases> {
        // unique per Leases, also within one process (the tests run several)
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nonce = (now_ms() << 16) | (SEQ.fetch_add(1, Ordering::SeqCst) & 0xffff);
        Ok(Leases {
            files: Files::of_store(store)?,
            owner: format!("{}:{}:{nonce:x}", host_name(), std::process::id()),
            worker: format!("worker {}/{}", worker.index + 1, worker.count),
            ttl,
            held: Arc::new(Mutex::new(Vec::new())),
            lost: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The lease at `rel` and how it was read, or `None` when there is none.
    fn read(files: &Files, rel: &str) -> Result<Option<(LeaseInfo, Read)>> {
        let Some(read) = files.get(rel)? else {
            return Ok(None);
        };
        let info = serde_json::from_slice(&read.bytes).map_err(|e| {
            Error::store(
                files.display(rel),
                format!("unreadable lease file ({e}); delete it"),
            )
        })?;
        Ok(Some((info, read)))
    }

    fn json(info: &LeaseInfo) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(info)?)
    }

    fn fresh(&self, part: &Part, rows_todo: usize) -> LeaseInfo {
        let now = now_ms();
        LeaseInfo {
            part: part.key.clone(),
            owner: self.owner.clone(),
            worker: self.worker.clone(),
            state: LeaseState::Running,
            renewed_unix_ms: now,
            expires_unix_ms: now + self.ttl.as_millis() as u64,
            rows_todo,
            rows_done: 0,
            rows_in_part: part.len,
        }
    }

    /// Tries to make `part` ours (`rows_todo`: its rows not stored yet, for progress).
    pub fn try_acquire(&self, part: &Part, rows_todo: usize) -> Result<Acquired> {
        let rel = lease_rel(&part.key);
        for _ in 0..4 {
            let info = self.fresh(part, rows_todo);
            if self.files.create(&rel, &Self::json(&info)?)? {
                self.held.lock().expect("lease lock").push(info);
                return Ok(Acquired::Ours { taken_over: false });
            }
            let Some((current, read)) = Self::read(&self.files, &rel)? else {
                continue; // released or being taken over right now: try again
            };
            match current.state {
                LeaseState::Done => return Ok(Acquired::Done(current)),
                LeaseState::Running if !current.abandoned() => return Ok(Acquired::Held(current)),
                LeaseState::Running => {}
            }
            // abandoned: replace it, if it is still the one read (one of several racing workers wins; a renewal
            // in between makes it fail, and the next round sees the lease held)
            let info = self.fresh(part, rows_todo);
            if self.files.take_over(&rel, &Self::json(&info)?, &read)? {
                self.held.lock().expect("lease lock").push(info);
                return Ok(Acquired::Ours { taken_over: true });
            }
        }
        match Self::read(&self.files, &rel)? {
            Some((current, _)) if current.state == LeaseState::Done => Ok(Acquired::Done(current)),
            Some((current, _)) => Ok(Acquired::Held(current)),
            None => Err(Error::store(
                self.files.display(&rel),
                "the lease of this part keeps changing hands; is another worker misbehaving?",
            )),
        }
    }

    /// Rewrites a held lease (renewal, progress, completion); false when it is no longer ours.
    fn rewrite(&self, info: &LeaseInfo) -> Result<bool> {
        let rel = lease_rel(&info.part);
        let read = match Self::read(&self.files, &rel)? {
            Some((current, read)) if current.owner == self.owner => read,
            _ => return Ok(false),
        };
        self.files.replace(&rel, &Self::json(info)?, &read)
    }

    /// Renews every held lease (the heartbeat); marks the leases lost when one was taken over.
    pub fn renew_all(&self) -> Result<()> {
        let mut held = self.held.lock().expect("lease lock");
        for info in held.iter_mut() {
            let now = now_ms();
            info.renewed_unix_ms = now;
            info.expires_unix_ms = now + self.ttl.as_millis() as u64;
            if !self.rewrite(info)? {
                self.lost.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Records progress on a held part (written at the next renewal).
    pub fn add_done(&self, key: &str, rows: usize) {
        if let Some(info) = self
            .held
            .lock()
            .expect("lease lock")
            .iter_mut()
            .find(|i| i.part == key)
        {
            info.rows_done += rows;
        }
    }

    /// Marks a held part finished (every row committed or skipped as bad) and stops renewing it.
    pub fn finish(&self, key: &str) -> Result<()> {
        let mut held = self.held.lock().expect("lease lock");
        let Some(i) = held.iter().position(|i| i.part == key) else {
            return Ok(());
        };
        let mut info = held.remove(i);
        info.state = LeaseState::Done;
        info.renewed_unix_ms = now_ms();
        if !self.rewrite(&info)? {
            self.lost.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Fails when another worker took over one of our leases (we stalled past the lease time): committing more
    /// rows of that part could store them twice.
    pub fn check_not_lost(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::store(
                self.files.display(LEASES),
                format!(
                    "another worker took over a part leased by this one ({}): this worker stalled for longer \
                     than --lease_seconds ({} s). Stopping so that no row is stored twice; rerun to continue \
                     (`sprint-prep --inspect` lists the parts)",
                    self.owner,
                    self.ttl.as_secs_f64()
                ),
            ));
        }
        Ok(())
    }

    /// Starts the heartbeat thread (renews every third of the lease time until [`Leases::stop`]).
    pub fn start_heartbeat(self: &Arc<Self>) {
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let every = me.ttl / 3;
            let mut waited = Duration::ZERO;
            while !me.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                waited += Duration::from_millis(50);
                if waited >= every {
                    waited = Duration::ZERO;
                    if let Err(e) = me.renew_all() {
                        tracing::warn!("renewing the prep leases: {e}");
                    }
                }
            }
        });
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every lease file of the store at `store` (for `--inspect`), sorted by part.
pub fn list_leases(store: &Path) -> Result<Vec<LeaseInfo>> {
    let files = Files::of_store(store)?;
    let mut out = Vec::new();
    for name in files.names(LEASES)? {
        if name.ends_with(".json") {
            if let Some((info, _)) = Leases::read(&files, &format!("{LEASES}/{name}"))? {
                out.push(info);
            }
        }
    }
    out.sort_by(|a, b| a.part.cmp(&b.part));
    Ok(out)
}

/// What identifies an input file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIdentity {
    pub name: String,
    pub size: u64,
    /// SHA-256 of the parquet footer (the file metadata and its 8-byte trailer).
    pub footer_sha256: String,
}

/// Size plus the hash of the parquet footer of `path`.
pub fn shard_identity(path: &Path, name: &str) -> Result<ShardIdentity> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if size < 12 {
        return Err(Error::data(path, "too short to be a parquet file"));
    }
    let mut trailer = [0u8; 8];
    f.seek(SeekFrom::End(-8))
        .and_then(|_| f.read_exact(&mut trailer))
        .map_err(|e| Error::io(path, e))?;
    let meta_len = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes")) as u64;
    if &trailer[4..] != b"PAR1" || meta_len + 8 > size {
        return Err(Error::data(path, "not a parquet file (no PAR1 footer)"));
    }
    let mut footer = vec![0u8; meta_len as usize + 8];
    f.seek(SeekFrom::End(-(meta_len as i64) - 8))
        .and_then(|_| f.read_exact(&mut footer))
        .map_err(|e| Error::io(path, e))?;
    Ok(ShardIdentity {
        name: name.to_string(),
        size,
        footer_sha256: format!("{:x}", Sha256::digest(&footer)),
    })
}

/// Checks every shard against the identity recorded in the store under its name, recording the new ones. A
/// known name with other content is refused, or (with `distinct`) renamed `<name>@<hash8>` so that its rows get
/// their own ids. Returns the shards with their final names.
pub fn check_shard_identities(
    store: &Path,
    shards: &[Shard],
    distinct: bool,
) -> Result<Vec<Shard>> {
    let dir = Files::of_store(store)?;
    let mut out = Vec::with_capacity(shards.len());
    let mut names = HashSet::new();
    for shard in shards {
        let id = shard_identity(&shard.path, &shard.name)?;
        let mut named = shard.clone();
        if let Some(known) = read_identity(&dir, &shard.name)? {
            if known != id {
                if !distinct {
                    return Err(Error::data(
                        &shard.path,
                        format!(
                            "the store already holds rows of another file named {} ({} bytes, footer SHA-256 {}…; \
                             this one: {} bytes, {}…). Its rows would be taken as already stored and never \
                             encoded. Write to a new --output, rename the file, or pass --distinct_shard_ids to \
                             store its rows as {}@{}#<row>",
                            shard.name,
                            known.size,
                            &known.footer_sha256[..12],
                            id.size,
                            &id.footer_sha256[..12],
                            shard.name,
                            &id.footer_sha256[..8]
                        ),
                    ));
                }
                named.name = format!("{}@{}", shard.name, &id.footer_sha256[..8]);
                let renamed = ShardIdentity {
                    name: named.name.clone(),
                    ..id
                };
                record_identity(&dir, &renamed, &shard.path)?;
            }
        } else {
            record_identity(&dir, &id, &shard.path)?;
        }
        if !names.insert(named.name.clone()) {
            return Err(Error::data(
                &shard.path,
                format!("two input files end up with the name {}", named.name),
            ));
        }
        out.push(named);
    }
    Ok(out)
}

fn identity_rel(name: &str) -> String {
    format!("{SPRINT_DIR}/shards/{}.json", file_stem(name))
}

fn read_identity(files: &Files, name: &str) -> Result<Option<ShardIdentity>> {
    let rel = identity_rel(name);
    match files.get(&rel)? {
        Some(read) => serde_json::from_slice(&read.bytes).map(Some).map_err(|e| {
            Error::store(
                files.display(&rel),
                format!("unreadable shard identity ({e})"),
            )
        }),
        None => Ok(None),
    }
}

/// Records `id` unless a record exists (created atomically; a concurrent worker's equal record is fine, a
/// different one is refused).
fn record_identity(files: &Files, id: &ShardIdentity, shard_path: &Path) -> Result<()> {
    if files.create(&identity_rel(&id.name), &serde_json::to_vec_pretty(id)?)? {
        return Ok(());
    }
    match read_identity(files, &id.name)? {
        Some(known) if known == *id => Ok(()),
        _ => Err(Error::data(
            shard_path,
            format!(
                "another worker recorded a different file under the name {} at the same time",
                id.name
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn shard(name: &str, rows: usize) -> Shard {
        Shard {
            path: PathBuf::from(name),
            name: name.into(),
            num_rows: rows,
        }
    }

    #[test]
    fn parts_cut_shards_into_blocks_and_go_round_robin() {
        let shards = [shard("a", 7), shard("b", 2), shard("c", 0), shard("d", 3)];
        let parts = plan_parts(&shards, 3);
        let keys: Vec<&str> = parts.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["a#0-2", "a#3-5", "a#6-6", "b#0-1", "d#0-2"]);
        assert_eq!(parts[2].len, 1);
        let w = |index, count| parts_of(&parts, Worker { index, count });
        let keys_of = |ps: Vec<Part>| ps.into_iter().map(|p| p.key).collect::<Vec<_>>();
        assert_eq!(keys_of(w(0, 2)), ["a#0-2", "a#6-6", "d#0-2"]);
        assert_eq!(keys_of(w(1, 2)), ["a#3-5", "b#0-1"]);
        // every part goes to exactly one worker, whatever the count
        for count in 1..7 {
            let mut all: Vec<String> = (0..count).flat_map(|i| keys_of(w(i, count))).collect();
            all.sort();
            let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            want.sort();
            assert_eq!(all, want, "{count} workers");
        }
    }

    #[test]
    fn a_lease_is_exclusive_until_it_expires_and_then_taken_over_once() {
        let store = tempfile::tempdir().unwrap();
        let part = plan_parts(&[shard("s", 4)], 4).remove(0);
        let ttl = Duration::from_millis(300);
        let a = Leases::new(store.path(), Worker { index: 0, count: 2 }, ttl).unwrap();
        let b = Leases::new(store.path(), Worker { index: 1, count: 2 }, ttl).unwrap();
        assert!(matches!(
            a.try_acquire(&part, 4).unwrap(),
            Acquired::Ours { taken_over: false }
        ));
        match b.try_acquire(&part, 4).unwrap() {
            Acquired::Held(info) => {
                assert_eq!(info.worker, "worker 1/2");
                assert!(
                    info.describe().contains("worker 1/2"),
                    "{}",
                    info.describe()
                );
            }
            other => panic!("{other:?}"),
        }
        // a renews: still held after the first lease time
        std::thread::sleep(Duration::from_millis(200));
        a.renew_all().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(matches!(
            b.try_acquire(&part, 4).unwrap(),
            Acquired::Held(_)
        ));
        // a stops renewing: b takes over, and a learns it lost the part
        std::thread::sleep(Duration::from_millis(400));
        assert!(matches!(
            b.try_acquire(&part, 4).unwrap(),
            Acquired::Ours { taken_over: true }
        ));
        a.check_not_lost().unwrap();
        a.renew_all().unwrap();
        assert!(a.check_not_lost().is_err());
        // b finishes: done for everybody
        b.add_done(&part.key, 4);
        b.finish(&part.key).unwrap();
        let c = Leases::new(store.path(), Worker::SINGLE, ttl).unwrap();
        match c.try_acquire(&part, 4).unwrap() {
            Acquired::Done(info) => assert_eq!((info.rows_done, info.rows_todo), (4, 4)),
            other => panic!("{other:?}"),
        }
        let listed = list_leases(store.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, LeaseState::Done);
    }

    #[test]
    fn a_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once() {
        let store = tempfile::tempdir().unwrap();
        let part = plan_parts(&[shard("s", 4)], 4).remove(0);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let ttl = Duration::from_secs(3600);
        let old = Leases::new(store.path(), Worker::SINGLE, ttl).unwrap();
        let mut info = old.fresh(&part, 4);
        info.owner = format!("{}:{dead_pid}:abc", host_name());
        assert!(old
            .files
            .create(&lease_rel(&part.key), &Leases::json(&info).unwrap())
            .unwrap());
        assert!(!info.expired() && info.abandoned());
        let again = Leases::new(store.path(), Worker::SINGLE, ttl).unwrap();
        assert!(matches!(
            again.try_acquire(&part, 4).unwrap(),
            Acquired::Ours { taken_over: true }
        ));
        // a live process of this machine (this one) is not abandoned, nor is another machine's lease
        let live = list_leases(store.path()).unwrap().remove(0);
        assert!(!live.abandoned());
        info.owner = format!("some-other-host:{dead_pid}:abc");
        assert!(!info.abandoned());
    }

    #[test]
    fn racing_workers_never_both_own_a_part() {
        let store = tempfile::tempdir().unwrap();
        let parts = plan_parts(&[shard("s", 64)], 1);
        let wins: Vec<Vec<String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let (dir, parts) = (store.path(), &parts);
                    scope.spawn(move || {
                        let l = Leases::new(
                            dir,
                            Worker { index: i, count: 4 },
                            Duration::from_secs(60),
                        )
                        .unwrap();
                        parts
                            .iter()
                            .filter(|p| {
                                matches!(l.try_acquire(p, 1).unwrap(), Acquired::Ours { .. })
                            })
                            .map(|p| p.key.clone())
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<String> = wins.concat();
        assert_eq!(all.len(), 64, "each part won exactly once");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 64);
    }

    #[test]
    fn shard_identity_refuses_a_different_file_under_a_known_name_or_renames_it() {
        let store = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let write = |dir: &Path, rows: i32| -> Shard {
            let path = dir.join("train_000.parquet");
            let batch = arrow_array::RecordBatch::try_from_iter([(
                "x",
                std::sync::Arc::new(arrow_array::Int32Array::from_iter_values(0..rows))
                    as arrow_array::ArrayRef,
            )])
            .unwrap();
            let f = std::fs::File::create(&path).unwrap();
            let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            Shard {
                path,
                name: "train_000.parquet".into(),
                num_rows: rows as usize,
            }
        };
        let first = write(data.path(), 5);
        let named =
            check_shard_identities(store.path(), std::slice::from_ref(&first), false).unwrap();
        assert_eq!(named[0].name, "train_000.parquet");
        // the same file again: accepted, same name
        let again = check_shard_identities(store.path(), &[first], false).unwrap();
        assert_eq!(again[0].name, "train_000.parquet");
        // another file with that name
        let other_dir = tempfile::tempdir().unwrap();
        let other = write(other_dir.path(), 6);
        let err = check_shard_identities(store.path(), std::slice::from_ref(&other), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--distinct_shard_ids"), "{err}");
        let renamed =
            check_shard_identities(store.path(), std::slice::from_ref(&other), true).unwrap();
        let hash = shard_identity(&other.path, "x").unwrap().footer_sha256;
        assert_eq!(renamed[0].name, format!("train_000.parquet@{}", &hash[..8]));
        assert_eq!(
            renamed[0].id(2),
            format!("train_000.parquet@{}#2", &hash[..8])
        );
        // and it stays accepted under that name
        let twice = check_shard_identities(store.path(), &[other], true).unwrap();
        assert_eq!(twice[0].name, renamed[0].name);
    }
}
