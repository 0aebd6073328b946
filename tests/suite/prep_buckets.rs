//! sprint-prep `--multi_scale` end to end on the tiny pipeline: images of many aspect ratios go to the nearest
//! bucket of the 512 table, device batches never mix shapes, every row's latent is the DC-AE encoding of its
//! own bucket transform, the store says it is bucketed (format_version 2, the table) and `--inspect` prints the
//! histogram; a bucketed run into a square store (and the reverse) is refused; a square run stays format 1.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use candle_core::Tensor;
use sana_sprint::buckets::BucketTable;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::store::{LatentStore, CONFIG_KEY};

use crate::prep_e2e::{hub, png, root};

/// (width, height) of the shard's images: 16:9, 9:16, 1:1, 4:5, 2:3, an extreme 10:1, two more 16:9 (a bucket
/// with a full batch of 2 and a leftover), and a corrupt row.
const SIZES: [(u32, u32); 8] = [
    (160, 90),
    (90, 160),
    (100, 100),
    (120, 150),
    (100, 150),
    (300, 30),
    (192, 108),
    (176, 99),
];

fn shard(path: &Path) -> Vec<Vec<u8>> {
    let mut images: Vec<Option<Vec<u8>>> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| Some(png(w, h, i as u32)))
        .collect();
    images.push(Some(b"not an image".to_vec()));
    let caps: Vec<String> = (0..images.len())
        .map(|i| format!("a picture number {i} of a wide or tall scene"))
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Binary, true),
        Field::new("llava", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(BinaryArray::from_iter(images.iter().map(|i| i.as_deref()))),
        Arc::new(StringArray::from_iter_values(caps)),
    ];
    let f = std::fs::File::create(path).unwrap();
    let batch = RecordBatch::try_new(schema, cols).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    images
        .into_iter()
        .take(SIZES.len())
        .map(Option::unwrap)
        .collect()
}

fn opts(shard: &Path, out: &Path, multi_scale: bool, resolution: u32) -> PrepOptions {
    PrepOptions {
        pretrained_model_name_or_path: root()
            .join("datasets/tiny-sana-sprint")
            .display()
            .to_string(),
        file_path: vec![shard.display().to_string()],
        output: out.to_path_buf(),
        resolution,
        batch_size: 2,
        commit_every: 3,
        num_workers: 2,
        progress: false,
        device: "cpu".into(),
        complex_human_instruction: false,
        max_sequence_length: 32,
        multi_scale,
        ..PrepOptions::default()
    }
}

#[test]
fn multi_scale_prep_stores_each_image_in_its_bucket() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("aspect_000.parquet");
    let images = shard(&input);
    let out = d.path().join("ms.lance");
    let o = opts(&input, &out, true, 512);
    let report = prep::run(&o, &hub()).unwrap();
    assert_eq!(report.rows_written, SIZES.len());
    assert_eq!(report.bad_rows.len(), 1);

    let store = LatentStore::open(&out).unwrap();
    let cfg = store.config().clone();
    assert_eq!(cfg.format_version, 2);
    let ms = cfg.multi_scale.clone().expect("a bucketed store says so");
    assert_eq!(
        (ms.table, ms.filter.as_str(), ms.buckets.len()),
        (512, "bicubic", 40)
    );
    let arrow: arrow_schema::Schema = store.dataset().schema().into();
    let meta: serde_json::Value = serde_json::from_str(&arrow.metadata[CONFIG_KEY]).unwrap();
    assert_eq!(
        meta["multi_scale"]["buckets"][0]["latent_shape"],
        serde_json::json!([32, 8, 32])
    );

    let table = BucketTable::for_resolution(512).unwrap();
    let enc = prep::load_encoders(&o, &hub()).unwrap();
    let rows: BTreeMap<String, _> = store
        .read_all()
        .unwrap()
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let mut want_hist: BTreeMap<[i32; 3], usize> = BTreeMap::new();
    for (i, bytes) in images.iter().enumerate() {
        let r = &rows[&format!("aspect_000.parquet#{i}")];
        let img = sana_sprint::image::decode_rgb(bytes).unwrap();
        let (_, b) = table.nearest(img.height(), img.width());
        let shape = [32, (b.height / 32) as i32, (b.width / 32) as i32];
        assert_eq!(r.latent_shape, shape, "row {i} ({:?})", SIZES[i]);
        *want_hist.entry(shape).or_default() += 1;
        // the row's latent is the encoding of its own bucket transform (whatever it was batched with)
        let mut pix = vec![0f32; 3 * (b.height * b.width) as usize];
        sana_sprint::image::preprocess_bucket_into(
            &img,
            (b.height, b.width),
            table.filter(),
            &mut pix,
        );
        let x = Tensor::from_vec(
            pix,
            (1, 3, b.height as usize, b.width as usize),
            &enc.device,
        )
        .unwrap();
        let lat: Vec<f32> = enc
            .vae
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r.latent.len(), lat.len(), "row {i}");
        let max = r
            .latent
            .iter()
            .zip(&lat)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "row {i}: latent differs by {max}");
    }
    // 16:9 three times (one full batch of 2 + a leftover), and distinct buckets for the other ratios
    assert_eq!(want_hist.get(&[32, 12, 21]), Some(&3), "{want_hist:?}");
    let hist: BTreeMap<[i32; 3], usize> = sana_sprint::store::inspect::bucket_histogram(&store)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(hist, want_hist);

    // --inspect prints the histogram
    let shown = Command::new(env!("CARGO_BIN_EXE_sprint-prep"))
        .args(["--inspect", out.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(
        text.contains(
            "buckets          the 512 px aspect-ratio table (bicubic), 6 of 40 bucket(s) used"
        ),
        "{text}"
    );
    assert!(
        text.contains("384x672 (h/w 0.57)") && text.contains("3 row(s)"),
        "{text}"
    );

    // the trainer's loader: batches of 2 from one bucket each; only the 16:9 bucket holds 2 rows, the others
    // (one row each) are skipped
    let mut loader = sana_sprint::train::loader::StoreLoader::start(
        LatentStore::open(&out).unwrap(),
        &sana_sprint::train::loader::LoaderOptions {
            batch_size: 2,
            ..Default::default()
        },
        Default::default(),
    )
    .unwrap();
    assert_eq!(loader.batches_per_epoch(), 1);
    for _ in 0..3 {
        let b = loader.next_batch().unwrap();
        assert_eq!((b.len(), b.latent_shape), (2, [32, 12, 21]));
    }

    // a rerun writes nothing; a square run into the bucketed store is refused, and the reverse
    assert_eq!(prep::run(&o, &hub()).unwrap().rows_written, 0);
    let square = prep::run(&opts(&input, &out, false, 512), &hub())
        .unwrap_err()
        .to_string();
    assert!(square.contains("multi_scale differs"), "{square}");
    let sq_out = d.path().join("square.lance");
    prep::run(&opts(&input, &sq_out, false, 64), &hub()).unwrap();
    let sq = LatentStore::open(&sq_out).unwrap();
    assert_eq!(sq.config().format_version, 1);
    let sq_meta: serde_json::Value = serde_json::from_str(
        &arrow_schema::Schema::from(sq.dataset().schema()).metadata[CONFIG_KEY],
    )
    .unwrap();
    assert!(
        sq_meta.get("multi_scale").is_none(),
        "square stores keep the v1 metadata"
    );
    let bucketed = prep::run(&opts(&input, &sq_out, true, 512), &hub())
        .unwrap_err()
        .to_string();
    assert!(bucketed.contains("differs"), "{bucketed}");
}

#[test]
fn multi_scale_needs_a_resolution_with_a_table() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("aspect_000.parquet");
    shard(&input);
    let err = prep::run(&opts(&input, &d.path().join("x.lance"), true, 768), &hub())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("512, 1024, 2048") && err.contains("768"),
        "{err}"
    );
}
