//! The trainer's view of a latent store: seeded per-epoch shuffling that is reproducible across resume,
//! background prefetch, and batches in the form the training step consumes (docs/ALGORITHM.md §5.5, ALGORITHM.md §5.5; STORE.md).
//!
//! `x0 = latent · vae_scaling_factor · σd`; prompt embeddings are padded back to `max_sequence_length` with
//! zeros and the mask rebuilt (ones then zeros); the negative embedding comes from the store's metadata.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, Receiver};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::SeededRng;
use crate::store::{LatentRow, LatentStore, RowReader, StoreConfig, StoredRow};
use crate::train::step::Batch;

/// Where the loader is: batch `batch` of epoch `epoch` is the next one it yields. Saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub batch: u64,
}

#[derive(Debug, Clone)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub seed: u64,
    /// Drop the last incomplete batch of an epoch (docs/ALGORITHM.md §9 #11: the CFG concatenation needs full batches).
    pub drop_last: bool,
    /// Batches prepared ahead of the trainer. Batches are read concurrently (and each batch's rows), as many
    /// as keep every core busy; the others wait finished.
    pub prefetch: usize,
    /// σd, applied to the latents with the VAE scaling factor.
    pub sigma_data: f32,
    /// `(rank, world size)` of a data-parallel run: global batch k is positions `[k·W·b, (k+1)·W·b)` of the
    /// epoch's permutation and this rank reads `[k·W·b + r·b, k·W·b + (r+1)·b)`, so W ranks with batch b read
    /// exactly the batches of one process with batch W·b. `(0, 1)` for a single process.
    pub shard: (usize, usize),
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            batch_size: 1,
            seed: 0,
            drop_last: true,
            prefetch: 4,
            sigma_data: 0.5,
            shard: (0, 1),
        }
    }
}

/// One training batch on the host, row-major.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// `latent · scaling · σd`, shape `(B, C, H, W)`.
    pub x0: Vec<f32>,
    pub latent_shape: [usize; 3],
    /// `(B, L, D)` with zero rows past each prompt's length.
    pub prompt_embeds: Vec<f32>,
    /// `(B, L)`: ones then zeros.
    pub mask: Vec<f32>,
    pub ids: Vec<String>,
    pub captions: Vec<String>,
    pub max_sequence_length: usize,
    pub hidden_size: usize,
    /// The position of this batch (resume from `position.next()` to continue after it).
    pub position: LoaderPosition,
}

impl TrainBatch {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The batch as the training step takes it: f32 tensors on `device`, with the run's negative prompt.
    pub fn to_batch(&self, negative: &NegativePrompt, device: &Device) -> Result<Batch> {
        let b = self.len();
        let [c, h, w] = self.latent_shape;
        let (l, d) = (self.max_sequence_length, self.hidden_size);
        Ok(Batch {
            x0: Tensor::from_slice(&self.x0, (b, c, h, w), device)?,
            prompt_embeds: Tensor::from_slice(&self.prompt_embeds, (b, l, d), device)?,
            prompt_mask: Tensor::from_slice(&self.mask, (b, l), device)?,
            neg_embeds: negative.embeds.clone(),
            neg_mask: negative.mask.clone(),
        })
    }
}

impl LoaderPosition {
    /// The position after this batch, wrapping to the next epoch.
    pub fn next(self, batches_per_epoch: u64) -> Self {
        if self.batch + 1 >= batches_per_epoch {
            Self {
                epoch: self.epoch + 1,
                batch: 0,
            }
        } else {
            Self {
                epoch: self.epoch,
                batch: self.batch + 1,
            }
        }
    }
}

/// The row order of `epoch`: a Fisher–Yates shuffle of `0..n` seeded by `(seed, epoch)`.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<u64> {
    let mut rng = SeededRng::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut perm: Vec<u64> = (0..n as u64).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

pub fn batches_per_epoch(rows: usize, batch_size: usize, drop_last: bool) -> u64 {
    if drop_last {
        (rows / batch_size) as u64
    } else {
        rows.div_ceil(batch_size) as u64
    }
}

/// Assembles a batch from store rows (pads embeddings, rebuilds the mask, scales latents).
pub fn assemble(
    rows: Vec<LatentRow>,
    config: &StoreConfig,
    sigma_data: f32,
    position: LoaderPosition,
) -> Result<TrainBatch> {
    assemble_stored(
        rows.into_iter().map(StoredRow::from).collect(),
        config,
        sigma_data,
        position,
    )
}

/// [`assemble`] from rows as stored: each value is converted to f32 once, straight into the batch.
pub fn assemble_stored(
    rows: Vec<StoredRow>,
    config: &StoreConfig,
    sigma_data: f32,
    position: LoaderPosition,
) -> Result<TrainBatch> {
    let (l, d) = (config.max_sequence_length, config.text_hidden_size);
    // a square store: the config's shape; a bucketed one: the first row's bucket, which every row of the batch
    // must share (the sampler never mixes buckets)
    let shape = match (&config.multi_scale, rows.first()) {
        (Some(ms), Some(first)) => {
            let s = first.latent_shape.map(|v| v as usize);
            if !ms.buckets.iter().any(|b| b.latent_shape == s) {
                return Err(Error::store(
                    "",
                    format!(
                        "row {} has latent_shape {s:?}, which is no bucket of the store's table",
                        first.id
                    ),
                ));
            }
            s
        }
        _ => config.latent_shape,
    };
    let numel: usize = shape.iter().product();
    let scale = config.vae_scaling_factor as f32 * sigma_data;
    let b = rows.len();
    let mut x0 = vec![0f32; b * numel];
    let mut emb = vec![0f32; b * l * d];
    let mut mask = vec![0f32; b * l];
    let (mut ids, mut captions) = (Vec::with_capacity(b), Vec::with_capacity(b));
    for (i, r) in rows.into_iter().enumerate() {
        let len = r.prompt_len as usize;
        let row_shape = r.latent_shape.map(|v| v as usize);
        if row_shape != shape
            || r.latent.len() != numel
            || len > l
            || r.prompt_embeds.len() != len * d
        {
            return Err(Error::store(
                "",
                format!(
                    "row {} does not match the store settings (latent_shape {:?} vs {:?}, prompt_len {}, {} embed values)",
                    r.id,
                    r.latent_shape,
                    shape,
                    r.prompt_len,
                    r.prompt_embeds.len()
                ),
            ));
        }
        let x = &mut x0[i * numel..(i + 1) * numel];
        r.latent.write_f32(x, scale);
        let e = &mut emb[i * l * d..i * l * d + len * d];
        r.prompt_embeds.write_f32(e, 1.0);
        // sprint-prep never writes NaN/Inf; a store written before it checked (or edited by hand) can hold some.
        // Such a row is refused, not skipped: the batches are a pure function of (row count, seed, epoch), and
        // dropping a row here would shrink this batch (and under several ranks desynchronise them), while dropping
        // it up front needs a scan of every value of the store at each start.
        let bad = |v: &[f32]| v.iter().position(|x| !x.is_finite());
        for (what, at) in [("latent", bad(x)), ("prompt embedding", bad(e))] {
            if let Some(k) = at {
                return Err(Error::store(
                    "",
                    format!(
                        "row {} holds a non-finite {what} (value {k} is {}): a row written by an older sprint-prep \
                         or damaged; every step that drew it would be NaN. Delete the row (Python: \
                         lance.dataset(STORE).delete(\"id = '{}'\"); `sprint-prep --verify STORE` lists every such \
                         row) or re-encode the store",
                        r.id,
                        if what == "latent" { x[k] } else { e[k] },
                        r.id
                    ),
                ));
            }
        }
        mask[i * l..i * l + len].iter_mut().for_each(|m| *m = 1.0);
        ids.push(r.id);
        captions.push(r.caption);
    }
    Ok(TrainBatch {
        x0,
        latent_shape: shape,
        prompt_embeds: emb,
        mask,
        ids,
        captions,
        max_sequence_length: l,
        hidden_size: d,
        position,
    })
}

/// The store's unconditional prompt repeated over a batch, on a device.
#[derive(Debug, Clone)]
pub struct NegativePrompt {
    /// `(B, L, D)`: the stored embedding, then zero rows.
    pub embeds: Tensor,
    /// `(B, L)`: ones then zeros.
    pub mask: Tensor,
}

impl NegativePrompt {
    /// The unconditional embedding of `config` repeated `batch_size` times, padded to `max_sequence_length`.
    pub fn repeated(config: &StoreConfig, batch_size: usize, device: &Device) -> Result<Self> {
        let (l, d, n) = (
            config.max_sequence_length,
            config.text_hidden_size,
            config.negative_prompt_len,
        );
        let neg = config.negative_prompt_embeds()?;
        let mut emb = vec![0f32; batch_size * l * d];
        let mut mask = vec![0f32; batch_size * l];
        for b in 0..batch_size {
            emb[b * l * d..b * l * d + n * d].copy_from_slice(&neg);
            mask[b * l..b * l + n].iter_mut().for_each(|m| *m = 1.0);
        }
        Ok(Self {
            embeds: Tensor::from_vec(emb, (batch_size, l, d), device)?,
            mask: Tensor::from_vec(mask, (batch_size, l), device)?,
        })
    }
}

/// The global batches of one epoch of a bucketed store: each bucket's rows shuffled by (seed, epoch, bucket) and
/// cut into batches of `global` rows (its incomplete tail dropped), then the batches of every bucket shuffled
/// together by (seed, epoch). A pure function of its arguments, so a resumed run sees the same batches.
pub fn bucket_epoch_batches(
    buckets: &[Vec<u64>],
    global: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<u64>> {
    let mut batches = Vec::new();
    for (i, rows) in buckets.iter().enumerate() {
        let bucket_seed = seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let perm = epoch_permutation(rows.len(), bucket_seed, epoch);
        for chunk in perm.chunks_exact(global) {
            batches.push(
                chunk
                    .iter()
                    .map(|&k| rows[k as usize])
                    .collect::<Vec<u64>>(),
            );
        }
    }
    let order = epoch_permutation(batches.len(), seed ^ 0xB0C7_E75A_17D0_0D1E, epoch);
    order.iter().map(|&k| batches[k as usize].clone()).collect()
}

/// The batches from `start` on, endlessly: `(position, store offsets)`, a pure function of (seed, epoch, batch).
struct BatchPlan {
    rows: usize,
    /// A bucketed store: the row offsets of each bucket (the epoch's batches come from
    /// [`bucket_epoch_batches`]; `perm` then holds the epoch's global batches back to back).
    buckets: Option<Arc<Vec<Vec<u64>>>>,
    /// (rank, world size): this rank's slice of each global batch.
    shard: (usize, usize),
    batch_size: usize,
    per_epoch: u64,
    seed: u64,
    pos: LoaderPosition,
    perm: Vec<u64>,
    perm_epoch: Option<u64>,
}

impl BatchPlan {
    fn new(
        rows: usize,
        shard: (usize, usize),
        batch_size: usize,
        per_epoch: u64,
        seed: u64,
        start: LoaderPosition,
    ) -> Self {
        Self {
            rows,
            buckets: None,
            shard,
            batch_size,
            per_epoch,
            seed,
            pos: start,
            perm: Vec::new(),
            perm_epoch: None,
        }
    }

    fn bucketed(mut self, buckets: Option<Arc<Vec<Vec<u64>>>>) -> Self {
        self.buckets = buckets;
        self
    }
}

impl Iterator for BatchPlan {
    type Item = (LoaderPosition, Vec<u64>);

    fn next(&mut self) -> Option<Self::Item> {
        let pos = self.pos;
        if self.perm_epoch != Some(pos.epoch) {
            self.perm = match &self.buckets {
                None => epoch_permutation(self.rows, self.seed, pos.epoch),
                // global batch k is positions [k·W·b, (k+1)·W·b), as for a square store
                Some(b) => {
                    bucket_epoch_batches(b, self.batch_size * self.shard.1, self.seed, pos.epoch)
                        .concat()
                }
            };
            self.perm_epoch = Some(pos.epoch);
        }
        let (rank, world) = self.shard;
        let lo = (pos.batch as usize * world + rank) * self.batch_size;
        let hi = (lo + self.batch_size).min(self.perm.len());
        self.pos = pos.next(self.per_epoch);
        Some((pos, self.perm[lo..hi].to_vec()))
    }
}

/// Reads a batch's rows concurrently and assembles them (runs as a task on the store's runtime).
async fn read_batch(
    reader: RowReader,
    offsets: Vec<u64>,
    config: Arc<StoreConfig>,
    sigma_data: f32,
    position: LoaderPosition,
) -> Result<TrainBatch> {
    let rows = futures::future::try_join_all(offsets.iter().map(|&o| reader.row(o))).await?;
    assemble_stored(rows, &config, sigma_data, position)
}

fn task_failed(path: &std::path::Path, e: tokio::task::JoinError) -> Error {
    let msg = match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(e) => e.to_string(),
    };
    Error::store(
        path,
        crate::store::verify::storage_message(
            path,
            &format!("reading a batch failed: {msg}"),
            false,
        ),
    )
}

/// Streams shuffled batches from a store on a background thread.
pub struct StoreLoader {
    rx: Receiver<Result<TrainBatch>>,
    config: StoreConfig,
    rows: usize,
    batches_per_epoch: u64,
    waited: Duration,
    _worker: std::thread::JoinHandle<()>,
}

impl StoreLoader {
    /// Starts prefetching from `start` out of `store`. This is the one place that refuses a store with fewer
    /// rows than one batch.
    pub fn start(store: LatentStore, opts: &LoaderOptions, start: LoaderPosition) -> Result<Self> {
        if opts.batch_size == 0 {
            return Err(Error::Arg("the batch size must be at least 1".into()));
        }
        let (rank, world) = opts.shard;
        if world == 0 || rank >= world {
            return Err(Error::Arg(format!(
                "rank {rank} of a world of {world} processes"
            )));
        }
        let rows = store.len()?;
        let global = opts.batch_size * world;
        // a bucketed store: batches hold one bucket's rows; a bucket with fewer rows than a global batch is
        // never drawn (said here, at start)
        let buckets: Option<Arc<Vec<Vec<u64>>>> = if store.config().multi_scale.is_some() {
            let by_shape = crate::store::inspect::rows_by_shape(&store)?;
            for (shape, r) in by_shape.iter().filter(|(_, r)| r.len() < global) {
                tracing::warn!(
                    "bucket with latents {shape:?} skipped: {} row(s), fewer than one batch of {global}",
                    r.len()
                );
            }
            Some(Arc::new(by_shape.into_iter().map(|(_, r)| r).collect()))
        } else {
            None
        };
        let per_epoch = match &buckets {
            None => batches_per_epoch(rows, global, opts.drop_last),
            Some(b) => b.iter().map(|r| (r.len() / global) as u64).sum(),
        };
        if per_epoch == 0 {
            let ranks = if world > 1 {
                format!(" × {world} ranks")
            } else {
                String::new()
            };
            return Err(Error::store(
                store.path(),
                if buckets.is_some() {
                    format!(
                        "no aspect-ratio bucket of the store holds one batch of {} (--train_batch_size){ranks}: \
                         the largest has {} of its {rows} rows",
                        opts.batch_size,
                        buckets.as_ref().map_or(0, |b| b.iter().map(Vec::len).max().unwrap_or(0))
                    )
                } else {
                    format!(
                        "{rows} rows is less than one batch of {} (--train_batch_size){ranks}",
                        opts.batch_size
                    )
                },
            ));
        }
        let config = store.config().clone();
        // Enough rows in flight to keep every core decoding, plus one batch so that cores freed by a batch's
        // last rows start the next one; more would only cost memory. The rest of the prefetch depth waits
        // finished in the channel.
        // On an object store a read waits on the network, not on a core: every prefetched batch is read at
        // once.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let prefetch = opts.prefetch.max(1);
        let in_flight = if store.is_remote() {
            prefetch
        } else {
            ((2 * cores).div_ceil(opts.batch_size) + 1).clamp(1, prefetch)
        };
        let (tx, rx) = bounded((prefetch - in_flight).max(1));
        let (opts, path): (LoaderOptions, PathBuf) = (opts.clone(), store.path().to_path_buf());
        let worker_config = Arc::new(config.clone());
        let worker = std::thread::Builder::new()
            .name("store-loader".into())
            .spawn(move || {
                let reader = store.row_reader();
                let handle = store.runtime().handle().clone();
                let plan = BatchPlan::new(
                    rows,
                    (rank, world),
                    opts.batch_size,
                    per_epoch,
                    opts.seed,
                    start,
                )
                .bucketed(buckets);
                let sigma_data = opts.sigma_data;
                // `buffered` yields in plan order whatever order the spawned reads finish in.
                let mut batches = futures::stream::iter(plan)
                    .map(|(pos, offsets)| {
                        let task = handle.spawn(read_batch(
                            reader.clone(),
                            offsets,
                            worker_config.clone(),
                            sigma_data,
                            pos,
                        ));
                        let path = path.clone();
                        async move { task.await.unwrap_or_else(|e| Err(task_failed(&path, e))) }
                    })
                    .buffered(in_flight);
                loop {
                    let batch = store
                        .runtime()
                        .block_on(batches.next())
                        .expect("the batch plan never ends")
                        .map_err(|e| match e {
                            Error::Store { msg, .. } => Error::store(&path, msg),
                            e => e,
                        });
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("store-loader thread", e))?;
        Ok(Self {
            rx,
            config,
            rows,
            batches_per_epoch: per_epoch,
            waited: Duration::ZERO,
            _worker: worker,
        })
    }

    /// The next batch (blocks only if the prefetch queue is empty; that time is counted in `waited`).
    pub fn next_batch(&mut self) -> Result<TrainBatch> {
        let t = Instant::now();
        let b = self
            .rx
            .recv()
            .map_err(|_| Error::Arg("the store loader stopped".into()))?;
        self.waited += t.elapsed();
        b
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// Total time the caller spent blocked on the loader.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three buckets of 7, 2 and 5 rows (offsets interleaved as prep writes them).
    fn buckets() -> Vec<Vec<u64>> {
        vec![
            vec![0, 3, 4, 7, 9, 11, 13],
            vec![1, 12],
            vec![2, 5, 6, 8, 10],
        ]
    }

    #[test]
    fn bucket_batches_hold_one_bucket_drop_tails_and_depend_only_on_seed_and_epoch() {
        let b = buckets();
        let bucket_of = |row: u64| b.iter().position(|r| r.contains(&row)).unwrap();
        let e0 = bucket_epoch_batches(&b, 2, 7, 0);
        // 7 -> 3 batches, 2 -> 1, 5 -> 2: 6 batches of 2, tails dropped
        assert_eq!(e0.len(), 6);
        let mut seen = std::collections::HashSet::new();
        for batch in &e0 {
            assert_eq!(batch.len(), 2);
            assert_eq!(bucket_of(batch[0]), bucket_of(batch[1]), "{batch:?}");
            for r in batch {
                assert!(seen.insert(*r), "row {r} twice in an epoch");
            }
        }
        assert_eq!(e0, bucket_epoch_batches(&b, 2, 7, 0), "reproducible");
        assert_ne!(
            e0,
            bucket_epoch_batches(&b, 2, 7, 1),
            "reshuffled each epoch"
        );
        assert_ne!(e0, bucket_epoch_batches(&b, 2, 8, 0), "seeded");
        // a bucket smaller than a batch is never drawn
        let e = bucket_epoch_batches(&b, 3, 7, 0);
        assert_eq!(e.len(), 3);
        assert!(e.iter().all(|batch| bucket_of(batch[0]) != 1));
    }

    #[test]
    fn bucketed_plan_resumes_exactly_and_ranks_split_the_global_batch() {
        let b = Arc::new(buckets());
        let per_epoch = 6;
        let plan = |shard, batch_size, start| {
            BatchPlan::new(14, shard, batch_size, per_epoch, 7, start).bucketed(Some(b.clone()))
        };
        let one: Vec<_> = plan((0, 1), 2, LoaderPosition::default())
            .take(15)
            .collect();
        // resuming at any position yields the same continuation
        for k in [1usize, 5, 6, 11] {
            let resumed: Vec<_> = plan((0, 1), 2, one[k].0).take(15 - k).collect();
            assert_eq!(resumed, one[k..], "resumed at {:?}", one[k].0);
        }
        // 2 ranks × batch 1 read exactly the global batches of 1 process × batch 2
        let r0: Vec<_> = plan((0, 2), 1, LoaderPosition::default())
            .take(15)
            .collect();
        let r1: Vec<_> = plan((1, 2), 1, LoaderPosition::default())
            .take(15)
            .collect();
        for k in 0..15 {
            assert_eq!(r0[k].0, one[k].0);
            assert_eq!(
                [r0[k].1.clone(), r1[k].1.clone()].concat(),
                one[k].1,
                "batch {k}"
            );
        }
    }
}
