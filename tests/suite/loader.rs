//! The trainer's store loader: batch contents against STORE.md, shuffling reproducibility across resume,
//! epoch coverage, format-version refusal, and fingerprint checks against a teacher folder.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sana_sprint::hub::HubConfig;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::store::compat::fingerprint_mismatches;
use sana_sprint::store::{
    FloatEncoding, LatentRow, LatentStore, OpenMode, StoreConfig, StoreDType, StoreWriter,
};
use sana_sprint::train::loader::{
    epoch_permutation, LoaderOptions, LoaderPosition, NegativePrompt, StoreLoader,
};

const D: usize = 6;
const L: usize = 10;

fn config() -> StoreConfig {
    crate::common::small_store_config(D, L, &(0..2 * D).map(|v| v as f32).collect::<Vec<_>>())
}

fn row(i: usize) -> LatentRow {
    let len = 1 + i % L;
    LatentRow {
        id: format!("s.parquet#{i}"),
        caption: format!("caption {i}"),
        latent: (0..8).map(|k| (i * 10 + k) as f32).collect(),
        latent_shape: [2, 2, 2],
        prompt_embeds: (0..len * D).map(|k| (i * 1000 + k) as f32).collect(),
        prompt_len: len as i32,
    }
}

fn make_store(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("s.lance");
    let mut w = StoreWriter::open(
        &path,
        config(),
        OpenMode::CreateOrAppend,
        FloatEncoding::default(),
    )
    .unwrap();
    for i in 0..n {
        w.push(row(i));
        if i % 4 == 3 {
            w.commit().unwrap(); // several fragments, as a real prep run makes
        }
    }
    w.commit().unwrap();
    path
}

fn opts(batch_size: usize, seed: u64, drop_last: bool) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        seed,
        drop_last,
        prefetch: 2,
        sigma_data: 0.5,
        shard: (0, 1),
    }
}

/// A loader over the store at `path`.
fn loader_at(path: &Path, opts: &LoaderOptions, position: LoaderPosition) -> StoreLoader {
    StoreLoader::start(LatentStore::open(path).unwrap(), opts, position).unwrap()
}

fn index_of(id: &str) -> usize {
    id.split('#').nth(1).unwrap().parse().unwrap()
}

#[test]
fn batches_follow_the_store_contract() {
    let d = tempfile::tempdir().unwrap();
    let path = make_store(d.path(), 11);
    let mut loader = loader_at(&path, &opts(3, 7, true), LoaderPosition::default());
    assert_eq!(loader.batches_per_epoch(), 3);
    let b = loader.next_batch().unwrap();
    assert_eq!(b.len(), 3);
    for (k, id) in b.ids.iter().enumerate() {
        let i = index_of(id);
        let want = row(i);
        assert_eq!(b.captions[k], want.caption);
        for j in 0..8 {
            let expect = want.latent[j] * 0.41407 * 0.5;
            assert!((b.x0[k * 8 + j] - expect).abs() < 1e-5);
        }
        let len = want.prompt_len as usize;
        let m = &b.mask[k * L..(k + 1) * L];
        assert!(m[..len].iter().all(|&v| v == 1.0) && m[len..].iter().all(|&v| v == 0.0));
        let e = &b.prompt_embeds[k * L * D..(k + 1) * L * D];
        assert_eq!(&e[..len * D], &want.prompt_embeds[..]);
        assert!(e[len * D..].iter().all(|&v| v == 0.0));
    }
    let cpu = candle_core::Device::Cpu;
    let negative = NegativePrompt::repeated(loader.config(), 3, &cpu).unwrap();
    let batch = b.to_batch(&negative, &cpu).unwrap();
    assert_eq!(batch.x0.dims(), &[3, 2, 2, 2]);
    assert_eq!(
        batch.x0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.x0
    );
    assert_eq!(batch.prompt_embeds.dims(), &[3, L, D]);
    assert_eq!(batch.prompt_mask.dims(), &[3, L]);
    assert_eq!(
        batch
            .prompt_mask
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        b.mask
    );
    let neg = negative
        .embeds
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(negative.embeds.dims(), &[3, L, D]);
    assert_eq!(
        &neg[L * D..L * D + 2 * D],
        &(0..2 * D).map(|v| v as f32).collect::<Vec<_>>()[..]
    );
    assert!(neg[L * D + 2 * D..2 * L * D].iter().all(|&v| v == 0.0));
    let neg_mask = negative
        .mask
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(&neg_mask[..L], &[1., 1., 0., 0., 0., 0., 0., 0., 0., 0.]);
    assert_eq!(batch.neg_embeds.dims(), &[3, L, D]);
}

#[test]
fn fewer_rows_than_one_batch_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let path = make_store(d.path(), 2);
    let store = LatentStore::open(&path).unwrap();
    let err = StoreLoader::start(store, &opts(3, 0, true), LoaderPosition::default())
        .err()
        .expect("a store of 2 rows has no batch of 3")
        .to_string();
    assert!(
        err.contains("2 rows is less than one batch of 3 (--train_batch_size)"),
        "{err}"
    );
    // without drop_last the short batch is a batch
    let mut loader = loader_at(&path, &opts(3, 0, false), LoaderPosition::default());
    assert_eq!(loader.next_batch().unwrap().len(), 2);
}

#[test]
fn epochs_cover_every_row_once_and_shuffle_reproducibly() {
    let d = tempfile::tempdir().unwrap();
    let path = make_store(d.path(), 10);
    let collect =
        |seed: u64, drop_last: bool, start: LoaderPosition, n: usize| -> Vec<Vec<String>> {
            let mut l = loader_at(&path, &opts(3, seed, drop_last), start);
            (0..n).map(|_| l.next_batch().unwrap().ids).collect()
        };
    // drop_last=false: 4 batches (3,3,3,1) cover all 10 rows exactly once.
    let epoch0 = collect(1, false, LoaderPosition::default(), 4);
    assert_eq!(
        epoch0.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 3, 1]
    );
    let seen: HashSet<&String> = epoch0.iter().flatten().collect();
    assert_eq!(seen.len(), 10);
    // drop_last=true: 3 full batches per epoch; the next batch starts epoch 1 with another order.
    let run = collect(1, true, LoaderPosition::default(), 6);
    assert_eq!(run[..3], epoch0[..3], "same seed, same order");
    assert_ne!(run[3..6], run[0..3], "epochs are reshuffled");
    assert_ne!(
        collect(2, true, LoaderPosition::default(), 3),
        run[..3].to_vec(),
        "seed matters"
    );
    // Resume from any position continues exactly as an uninterrupted run.
    let resumed = collect(1, true, LoaderPosition { epoch: 0, batch: 2 }, 4);
    assert_eq!(resumed, run[2..6].to_vec());
    assert_eq!(epoch_permutation(10, 1, 0), epoch_permutation(10, 1, 0));
}

/// Rows big enough to span several Lance mini-block chunks, read in multi-row batches (lance#8558 territory):
/// every value must come back exactly.
#[test]
fn large_rows_come_back_exactly_in_multi_row_batches() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("big.lance");
    let mut cfg = config();
    cfg.latent_shape = [8, 32, 32];
    cfg.max_sequence_length = 300;
    cfg.text_hidden_size = 64;
    let big = |i: usize| LatentRow {
        id: format!("big.parquet#{i}"),
        caption: format!("c{i}"),
        latent: (0..8 * 32 * 32)
            .map(|k| ((i * 7919 + k) % 1000) as f32 * 0.5)
            .collect(),
        latent_shape: [8, 32, 32],
        prompt_embeds: (0..(100 + i) * 64)
            .map(|k| ((i + k) % 2048) as f32)
            .collect(),
        prompt_len: (100 + i) as i32,
    };
    let mut w = StoreWriter::open(
        &path,
        cfg,
        OpenMode::CreateOrAppend,
        FloatEncoding::default(),
    )
    .unwrap();
    for i in 0..6 {
        w.push(big(i));
    }
    w.commit().unwrap();
    let mut loader = loader_at(&path, &opts(3, 5, true), LoaderPosition::default());
    for _ in 0..2 {
        let b = loader.next_batch().unwrap();
        for (k, id) in b.ids.iter().enumerate() {
            let want = big(index_of(id));
            let n = 8 * 32 * 32;
            let scale = 0.41407f32 * 0.5;
            assert!(b.x0[k * n..(k + 1) * n]
                .iter()
                .zip(&want.latent)
                .all(|(a, w)| *a == w * scale));
            let len = want.prompt_len as usize;
            assert_eq!(
                &b.prompt_embeds[k * 300 * 64..k * 300 * 64 + len * 64],
                &want.prompt_embeds[..]
            );
        }
    }
}

/// Read-ahead changes how rows are fetched, never what is yielded: the batches are exactly the epoch
/// permutation's slices, in order, whatever the prefetch depth.
#[test]
fn batches_are_the_permutation_in_order_whatever_the_prefetch() {
    let d = tempfile::tempdir().unwrap();
    let path = make_store(d.path(), 13);
    let run = |prefetch: usize| -> Vec<(LoaderPosition, Vec<String>, Vec<f32>)> {
        let o = LoaderOptions {
            prefetch,
            ..opts(2, 9, true)
        };
        let mut l = loader_at(&path, &o, LoaderPosition::default());
        (0..15)
            .map(|_| {
                let b = l.next_batch().unwrap();
                (b.position, b.ids, b.prompt_embeds)
            })
            .collect()
    };
    let one = run(1);
    assert_eq!(one, run(8));
    for (k, (pos, ids, _)) in one.iter().enumerate() {
        let (epoch, batch) = (k as u64 / 6, k as u64 % 6);
        assert_eq!(*pos, LoaderPosition { epoch, batch });
        let perm = epoch_permutation(13, 9, epoch);
        let want: Vec<usize> = perm[batch as usize * 2..batch as usize * 2 + 2]
            .iter()
            .map(|&i| i as usize)
            .collect();
        assert_eq!(ids.iter().map(|i| index_of(i)).collect::<Vec<_>>(), want);
    }
}

/// A float16 store (both columns): values come back exact through the bulk f16 → f32 conversion.
#[test]
fn float16_columns_come_back_exactly() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("h.lance");
    let mut cfg = config();
    cfg.latent_dtype = StoreDType::Float16;
    cfg.embed_dtype = StoreDType::Float16;
    // Integers below 2048 and halves are exact in f16.
    let half_row = |i: usize| LatentRow {
        latent: (0..8).map(|k| (i * 10 + k) as f32 * 0.5).collect(),
        prompt_embeds: (0..(1 + i % L) * D)
            .map(|k| -((i * 100 + k) as f32))
            .collect(),
        ..row(i)
    };
    let mut w = StoreWriter::open(
        &path,
        cfg,
        OpenMode::CreateOrAppend,
        FloatEncoding::default(),
    )
    .unwrap();
    for i in 0..5 {
        w.push(half_row(i));
    }
    w.commit().unwrap();
    let mut loader = loader_at(&path, &opts(5, 3, true), LoaderPosition::default());
    let b = loader.next_batch().unwrap();
    for (k, id) in b.ids.iter().enumerate() {
        let want = half_row(index_of(id));
        let x0: Vec<f32> = want.latent.iter().map(|v| v * (0.41407f32 * 0.5)).collect();
        assert_eq!(&b.x0[k * 8..(k + 1) * 8], &x0[..]);
        let len = want.prompt_len as usize;
        assert_eq!(
            &b.prompt_embeds[k * L * D..k * L * D + len * D],
            &want.prompt_embeds[..]
        );
        assert!(b.prompt_embeds[k * L * D + len * D..(k + 1) * L * D]
            .iter()
            .all(|&v| v == 0.0));
    }
    let back = LatentStore::open(&path).unwrap().take(&[3, 0]).unwrap();
    assert_eq!(back, vec![half_row(3), half_row(0)]);
}

#[test]
fn unknown_format_version_is_refused() {
    // 3 is unknown; 2 (aspect-ratio buckets) must come with its `multi_scale` entry
    for (version, says) in [
        (3, "not supported"),
        (2, "requires a \"multi_scale\" entry"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let path = make_store(d.path(), 2);
        let mut cfg: serde_json::Value = serde_json::to_value(config()).unwrap();
        cfg["format_version"] = serde_json::json!(version);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut ds = lance::dataset::Dataset::open(path.to_str().unwrap())
                .await
                .unwrap();
            ds.update_schema_metadata([("sprint.config".to_string(), Some(cfg.to_string()))])
                .await
                .unwrap();
        });
        let err = LatentStore::open(&path)
            .err()
            .expect("must refuse")
            .to_string();
        assert!(
            err.contains("format_version") && err.contains(says),
            "{version}: {err}"
        );
    }
}

#[test]
fn fingerprints_are_checked_against_the_teacher_folder() {
    let teacher = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint");
    let mism = fingerprint_mismatches(&config(), &teacher).unwrap();
    assert_eq!(mism.len(), 3, "{mism:?}");
    // A store prepared from the same folder matches it.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("p.lance");
    let o = PrepOptions {
        pretrained_model_name_or_path: teacher.display().to_string(),
        file_path: vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("datasets/demo/train_001.parquet")
            .display()
            .to_string()],
        output: out.clone(),
        resolution: 64,
        progress: false,
        device: "cpu".into(),
        ..PrepOptions::default()
    };
    let hub = HubConfig {
        cache_dir: d.path().join("cache"),
        offline: true,
        revision: "main".into(),
    };
    prep::run(&o, &hub).unwrap();
    let store = LatentStore::open(&out).unwrap();
    assert!(fingerprint_mismatches(store.config(), &teacher)
        .unwrap()
        .is_empty());
}
