//! Aspect-ratio buckets against NVlabs Sana's multi-scale code run for real: the bucket chosen for thousands
//! of sizes (near-ties between keys included), and the transform's uint8 crop (PIL BICUBIC / LANCZOS resize +
//! torchvision CenterCrop), bit-exact, on generated images and on PIL's decoded RGB of every fixture image.
//!
//! Fixture: tests/fixtures/buckets_ref.json, written by tools/golden/make_bucket_fixtures.py (Pillow 13.0.0,
//! torchvision 0.29.2). Tolerance: none (equal SHA-256 of the crop, equal channel sums).

use crate::common::fixture_path;

use image::RgbImage;
use safetensors::SafeTensors;
use sana_sprint::buckets::BucketTable;
use sana_sprint::image::{bucket_resize_size, resize_center_crop_to};
use sha2::{Digest, Sha256};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    source: String,
    size: [u32; 2],
    table: u32,
    key: String,
    bucket: [u32; 2],
    resize: [u32; 2],
    filter: String,
    sha256: String,
    channel_sums: [u64; 3],
    #[serde(default)]
    row_sums: Vec<[u64; 3]>,
}

#[derive(serde::Deserialize)]
struct Reference {
    tables: std::collections::BTreeMap<String, Vec<(String, u32, u32)>>,
    choices: Vec<[u32; 3]>,
    cases: Vec<Case>,
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture_path("buckets_ref.json")).unwrap())
        .unwrap()
}

/// The generator's `pattern(w, h)`: high-frequency synthetic RGB.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (i64::from(x), i64::from(y));
        let r = (x * x * 3 + y * 5 + x * y) % 256;
        let g = (x * 7 + y * y * 11 + (x ^ y)) % 256;
        let b = ((x / 3) * (y / 5) * 13 + x + 2 * y) % 256;
        image::Rgb([r as u8, g as u8, b as u8])
    })
}

fn pil_rgb(tensors: &[u8], name: &str) -> RgbImage {
    let st = SafeTensors::deserialize(tensors).unwrap();
    let t = st.tensor(&format!("{name}.rgb")).unwrap();
    let (h, w) = (t.shape()[0] as u32, t.shape()[1] as u32);
    RgbImage::from_raw(w, h, t.data().to_vec()).unwrap()
}

#[test]
fn tables_match_the_reference_tables() {
    let r = reference();
    for res in [512, 1024, 2048] {
        let ours: Vec<(String, u32, u32)> = BucketTable::for_resolution(res)
            .unwrap()
            .entries()
            .map(|(k, b)| (k.to_string(), b.height, b.width))
            .collect();
        assert_eq!(ours, r.tables[&res.to_string()], "table {res}");
    }
}

#[test]
fn the_nearest_bucket_is_the_references_for_every_size_and_near_tie() {
    let r = reference();
    let table = BucketTable::for_resolution(512).unwrap();
    let mut wrong = Vec::new();
    for &[h, w, want] in &r.choices {
        let (got, _) = table.nearest(h, w);
        if got != want as usize {
            wrong.push(format!(
                "{h}x{w}: ours {} reference {}",
                table.key(got),
                table.key(want as usize)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} sizes differ: {:?}",
        wrong.len(),
        r.choices.len(),
        &wrong[..wrong.len().min(10)]
    );
}

#[test]
fn the_bucket_transform_is_bit_exact_with_pil_and_torchvision() {
    let r = reference();
    let tensors = std::fs::read(fixture_path("images_ref.safetensors")).unwrap();
    let mut failed = Vec::new();
    for c in &r.cases {
        let img = match c.source.as_str() {
            "pattern" => pattern(c.size[0], c.size[1]),
            "images_ref" => pil_rgb(&tensors, &c.name),
            other => panic!("unknown source {other}"),
        };
        assert_eq!(img.dimensions(), (c.size[0], c.size[1]), "{}", c.name);
        let table = BucketTable::for_resolution(c.table).unwrap();
        let (index, bucket) = table.nearest(img.height(), img.width());
        let what = format!("{} at {} ({})", c.name, c.table, c.filter);
        assert_eq!(table.key(index), c.key, "{what}: key");
        assert_eq!([bucket.height, bucket.width], c.bucket, "{what}: bucket");
        assert_eq!(table.filter().name(), c.filter, "{what}: filter");
        let (rw, rh) = bucket_resize_size(img.width(), img.height(), bucket.height, bucket.width);
        assert_eq!([rh, rw], c.resize, "{what}: resize size");
        let crop = resize_center_crop_to(&img, (bucket.height, bucket.width), table.filter());
        assert_eq!(crop.dimensions(), (bucket.width, bucket.height), "{what}");
        let sha = format!("{:x}", Sha256::digest(crop.as_raw()));
        let mut sums = [0u64; 3];
        for px in crop.as_raw().chunks_exact(3) {
            for (s, &v) in sums.iter_mut().zip(px) {
                *s += u64::from(v);
            }
        }
        if sha != c.sha256 || sums != c.channel_sums {
            let first_row = c.row_sums.iter().enumerate().find_map(|(y, want)| {
                let row =
                    &crop.as_raw()[y * bucket.width as usize * 3..][..bucket.width as usize * 3];
                let mut got = [0u64; 3];
                for px in row.chunks_exact(3) {
                    for (s, &v) in got.iter_mut().zip(px) {
                        *s += u64::from(v);
                    }
                }
                (got != *want).then(|| format!(", first row differing {y}: {got:?} vs {want:?}"))
            });
            failed.push(format!(
                "{what}: channel sums {sums:?} vs {:?}{}",
                c.channel_sums,
                first_row.unwrap_or_default()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} crops differ from PIL + torchvision:\n{}",
        failed.len(),
        r.cases.len(),
        failed.join("\n")
    );
}
