//! Store economy: bytes per sample and read speed of the latent store under candidate Lance encodings, on
//! samples shaped like the real 1024 px data (latent 32×32×32 f32, prompt 120–300 tokens × 2304 f16 from bf16
//! values).
//!
//! Then the trainer's loader on the default and the plain encodings: where a shuffled batch's time goes (Lance
//! read of a row, assembly), and shuffled samples/s against the sequential read rate of the same files measured
//! in the same run.
//!
//! `cargo bench --profile dev --bench store [-- ROWS] [--loader-only]` (default 64 rows; `--loader-only` keeps
//! only the loader's two encodings). Prints tables; never fails on speed.
//! The latents are smooth fields plus noise (like VAE latents, unlike white noise); the embeddings are Gaussian
//! values rounded to bf16 first, as Gemma in bf16 produces them.
//!
//! `cargo bench --profile dev --bench store -- --fragments [ROWS]` (default 256 rows): the loader on a store
//! written one row per commit (one fragment per row, as many tiny prep commits leave it) against the same store
//! after `store::maintain::compact`.
//!
//! `cargo bench --profile dev --bench store -- --remote s3://bucket/bench.lance [ROWS]` (default 256 rows): the
//! loader on the same rows in a local store and in one at the URI (an object store; endpoint and credentials
//! from the AWS_* variables; the URI must not hold a store yet); `--commit-rows N` commits every N rows (one data
//! file each) instead of once.

use std::time::Instant;

use sana_sprint::rng::SeededRng;
use sana_sprint::train::loader::{
    assemble_stored, epoch_permutation, LoaderOptions, LoaderPosition, StoreLoader,
};

use sana_sprint::store::{
    FloatEncoding, LatentRow, LatentStore, ModelInfo, ModelsInfo, OpenMode, PreprocessInfo,
    StoreConfig, StoreDType, StoreWriter, StoredRow,
};

fn config(latent: StoreDType, embed: StoreDType) -> StoreConfig {
    let m = ModelInfo {
        origin: "bench".into(),
        fingerprint: "sha256:0".into(),
    };
    StoreConfig {
        format_version: 1,
        resolution: 1024,
        max_sequence_length: 300,
        complex_human_instruction: None,
        vae_scaling_factor: 0.41407,
        text_hidden_size: 2304,
        latent_dtype: latent,
        embed_dtype: embed,
        negative_prompt_len: 1,
        negative_prompt_embeds_f32le_b64: StoreConfig::encode_negative(&vec![0.0; 2304]),
        models: ModelsInfo {
            vae: m.clone(),
            text_encoder: m.clone(),
            tokenizer: m,
        },
        preprocess: PreprocessInfo {
            resize: "bench".into(),
            crop: "bench".into(),
            normalize: "bench".into(),
            mixed_precision: "bf16".into(),
        },
        latent_shape: [32, 32, 32],
        writer: "bench".into(),
        multi_scale: None,
        validation_prompts: Vec::new(),
        validation_max_sequence_length: None,
    }
}

fn rows(n: usize) -> Vec<LatentRow> {
    let mut rng = SeededRng::new(7);
    (0..n)
        .map(|i| {
            let mut latent = Vec::with_capacity(32 * 32 * 32);
            let noise = rng.normal(32 * 32 * 32);
            for c in 0..32 {
                let (fx, fy, ph) = (
                    rng.unit() as f32 * 0.3,
                    rng.unit() as f32 * 0.3,
                    rng.unit() as f32 * 6.0,
                );
                for y in 0..32 {
                    for x in 0..32 {
                        let smooth =
                            (fx * x as f32 + fy * y as f32 + ph).sin() * (1.0 + c as f32 * 0.02);
                        latent.push(smooth + 0.3 * noise[latent.len()]);
                    }
                }
            }
            let len = 120 + (i * 37) % 180;
            let prompt_embeds = rng
                .normal(len * 2304)
                .into_iter()
                .map(|v| half::bf16::from_f32(v * 2.0).to_f32())
                .collect();
            LatentRow {
                id: format!("bench.parquet#{i}"),
                caption: "a bench caption".repeat(8),
                latent,
                latent_shape: [32, 32, 32],
                prompt_embeds,
                prompt_len: len as i32,
            }
        })
        .collect()
}

fn main() {
    let rows_arg: Option<usize> = std::env::args().skip(1).find_map(|a| a.parse().ok());
    if std::env::args().any(|a| a == "--fragments") {
        fragments(rows_arg.unwrap_or(256));
        return;
    }
    if let Some(uri) = std::env::args().skip_while(|a| a != "--remote").nth(1) {
        let commit_rows = std::env::args()
            .skip_while(|a| a != "--commit-rows")
            .nth(1)
            .and_then(|v| v.parse().ok());
        local_vs_remote(rows_arg.unwrap_or(256), &uri, commit_rows);
        return;
    }
    let n = rows_arg.unwrap_or(64);
    let loader_only = std::env::args().any(|a| a == "--loader-only");
    let data = rows(n);
    let mean_len = data.iter().map(|r| r.prompt_len as f64).sum::<f64>() / n as f64;
    let raw_f16 = 2.0 * (32.0 * 32.0 * 32.0 + mean_len * 2304.0);
    println!("{n} rows, mean prompt_len {mean_len:.0}, raw f16 bytes/sample {raw_f16:.0}");
    println!(
        "{:<34} {:>12} {:>9} {:>12} {:>12}",
        "encoding", "bytes/sample", "vs f16", "write s", "read rows/s"
    );
    let enc = |zstd_level: Option<i32>, byte_stream_split: bool| FloatEncoding {
        zstd_level,
        byte_stream_split,
    };
    for (name, latent, encoding) in [
        ("latent f32, plain", StoreDType::Float32, enc(None, false)),
        (
            "latent f32, zstd 3",
            StoreDType::Float32,
            enc(Some(3), false),
        ),
        (
            "latent f32, zstd 1 + bss",
            StoreDType::Float32,
            enc(Some(1), true),
        ),
        (
            "latent f32, zstd 3 + bss (default)",
            StoreDType::Float32,
            enc(Some(3), true),
        ),
        (
            "latent f32, zstd 9 + bss",
            StoreDType::Float32,
            enc(Some(9), true),
        ),
        (
            "latent f16, zstd 3 + bss",
            StoreDType::Float16,
            enc(Some(3), true),
        ),
    ] {
        let is_default = encoding == FloatEncoding::default() && latent == StoreDType::Float32;
        // The loader also runs on the plain store: what zstd's per-mini-block decode costs it.
        let with_loader = is_default || name == "latent f32, plain";
        if loader_only && !with_loader {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.lance");
        let t = Instant::now();
        let mut w = StoreWriter::open(
            &path,
            config(latent, StoreDType::Float16),
            OpenMode::CreateOrAppend,
            encoding,
        )
        .unwrap();
        for r in data.iter().cloned() {
            w.push(r);
        }
        w.commit().unwrap();
        let write_s = t.elapsed().as_secs_f64();
        let store = LatentStore::open(&path).unwrap();
        let bytes = store.disk_bytes() as f64 / n as f64;
        let t = Instant::now();
        let back = store.read_all().unwrap();
        let read = back.len() as f64 / t.elapsed().as_secs_f64();
        println!(
            "{name:<34} {bytes:>12.0} {:>8.3}x {write_s:>12.2} {read:>12.1}",
            bytes / raw_f16
        );
        if with_loader {
            read_path_breakdown(&store, n);
            loader_throughput(&path, n);
        }
    }
}

fn read_files(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        total += if p.is_dir() {
            read_files(&p)
        } else {
            std::fs::read(&p).unwrap().len() as u64
        };
    }
    total
}

/// Samples/s (and CPU time per sample) of the shuffled, prefetched loader vs the sequential read rate of the
/// store's files.
fn loader_throughput(path: &std::path::Path, n: usize) {
    let t = Instant::now();
    let bytes = read_files(path);
    let seq = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    let per_sample = bytes as f64 / n as f64;
    println!(
        "  sequential read of the store files: {seq:.0} MB/s ({:.0} samples/s equivalent)",
        seq * 1e6 / per_sample
    );
    loader_rates(path, n, Some(seq));
}

/// Samples/s of the shuffled, prefetched loader at batch 1 and 4 (against the sequential rate when known).
fn loader_rates(path: &std::path::Path, n: usize, seq: Option<f64>) {
    let per_sample = {
        let store = LatentStore::open(path).unwrap();
        store.disk_bytes() as f64 / n as f64
    };
    for batch_size in [1usize, 4] {
        let opts = LoaderOptions {
            batch_size,
            seed: 1,
            drop_last: true,
            prefetch: 4,
            sigma_data: 0.5,
            shard: (0, 1),
        };
        let cpu = sana_sprint::system::cpu_seconds().unwrap_or(0.0);
        let store = LatentStore::open(path).unwrap();
        let mut loader = StoreLoader::start(store, &opts, LoaderPosition::default()).unwrap();
        let batches = 2 * loader.batches_per_epoch() as usize;
        let t = Instant::now();
        for _ in 0..batches {
            loader.next_batch().unwrap();
        }
        let sps = (batches * batch_size) as f64 / t.elapsed().as_secs_f64();
        let cpu_ms = 1e3 * (sana_sprint::system::cpu_seconds().unwrap_or(0.0) - cpu)
            / (batches * batch_size) as f64;
        let of_seq = seq.map_or(String::new(), |seq| {
            format!(
                " ({:.0}% of sequential)",
                100.0 * sps * per_sample / 1e6 / seq
            )
        });
        println!(
            "  loader, shuffled, batch {batch_size}: {sps:.1} samples/s = {:.0} MB/s of store{of_seq}, {cpu_ms:.2} CPU ms/sample",
            sps * per_sample / 1e6,
        );
    }
}

/// Where a shuffled batch's time goes, in means over one shuffled epoch: the Lance read of one row alone, a
/// batch of 4 rows read concurrently, and assembling them into a training batch (f32 conversion, padding).
fn read_path_breakdown(store: &LatentStore, n: usize) {
    let reader = store.row_reader();
    let rt = store.runtime();
    let perm = epoch_permutation(n, 1, 0);
    let ms = |t: Instant, k: usize| 1e3 * t.elapsed().as_secs_f64() / k as f64;
    let t = Instant::now();
    for &o in &perm {
        rt.block_on(reader.row(o)).unwrap();
    }
    println!(
        "  read path: one row alone (Lance take): {:.2} ms/row",
        ms(t, n)
    );
    let batches: Vec<&[u64]> = perm.chunks_exact(4).collect();
    let t = Instant::now();
    let rows: Vec<Vec<StoredRow>> = batches
        .iter()
        .map(|b| store.take_stored(b).unwrap())
        .collect();
    println!(
        "  read path: 4 rows read concurrently: {:.2} ms/batch",
        ms(t, batches.len())
    );
    let cfg = store.config().clone();
    let t = Instant::now();
    for r in rows {
        assemble_stored(r, &cfg, 0.5, LoaderPosition::default()).unwrap();
    }
    println!(
        "  read path: assembling 4 rows into a batch: {:.2} ms/batch",
        ms(t, batches.len())
    );
}

/// The loader on a store of `n` one-row fragments, then on the same store compacted to one fragment.
fn fragments(n: usize) {
    let data = rows(n);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fragments.lance");
    let t = Instant::now();
    let mut w = StoreWriter::open(
        &path,
        config(StoreDType::Float32, StoreDType::Float16),
        OpenMode::CreateOrAppend,
        FloatEncoding::default(),
    )
    .unwrap();
    for r in data {
        w.push(r);
        w.commit().unwrap();
    }
    drop(w);
    println!(
        "{n} rows written one per commit in {:.1} s (default encoding)",
        t.elapsed().as_secs_f64()
    );
    let describe = |what: &str| {
        let store = LatentStore::open(&path).unwrap();
        println!(
            "{what}: {} fragments, {:.1} MB on disk, version {}, needs_compaction {}",
            store.num_fragments(),
            store.disk_bytes() as f64 / 1e6,
            store.version(),
            sana_sprint::store::maintain::needs_compaction(&path).unwrap()
        );
    };
    describe("fragmented");
    loader_throughput(&path, n);
    let t = Instant::now();
    let report = sana_sprint::store::maintain::compact(&path).unwrap();
    println!(
        "compacted in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        serde_json::to_string(&report).unwrap()
    );
    describe("compacted");
    loader_throughput(&path, n);
}

/// The loader on `n` rows stored locally and the same rows at `uri` (an object store), committed every
/// `commit_rows` rows (default: one commit, one data file).
fn local_vs_remote(n: usize, uri: &str, commit_rows: Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.lance");
    let remote = std::path::PathBuf::from(uri);
    for path in [&local, &remote] {
        let t = Instant::now();
        let mut w = StoreWriter::open(
            path,
            config(StoreDType::Float32, StoreDType::Float16),
            OpenMode::CreateOrAppend,
            FloatEncoding::default(),
        )
        .unwrap();
        for (i, r) in rows(n).into_iter().enumerate() {
            w.push(r);
            if commit_rows.is_some_and(|c| (i + 1) % c == 0) {
                w.commit().unwrap();
            }
        }
        w.commit().unwrap();
        drop(w);
        let store = LatentStore::open(path).unwrap();
        println!(
            "{}: {n} rows written in {:.1} s, {} fragment(s), {:.1} MB",
            path.display(),
            t.elapsed().as_secs_f64(),
            store.num_fragments(),
            store.disk_bytes() as f64 / 1e6
        );
        loader_rates(path, n, None);
    }
}
