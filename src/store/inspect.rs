//! `sprint-prep --inspect`: a summary of a store.

use std::collections::BTreeMap;

use arrow_array::{Array, Int32Array, RecordBatch};
use futures::TryStreamExt;

use super::reader::{column, LatentStore};
use super::schema::columns;
use crate::error::Result;

/// A summary of a store for `sprint-prep --inspect`.
pub fn describe(store: &LatentStore) -> Result<BTreeMap<&'static str, serde_json::Value>> {
    let rows = store.len()?;
    let c = store.config();
    let bytes = store.disk_bytes();
    let latent_numel = c.latent_shape.iter().product::<usize>();
    let mut out = BTreeMap::new();
    out.insert(
        "path",
        serde_json::json!(store.path().display().to_string()),
    );
    out.insert("rows", serde_json::json!(rows));
    out.insert("lance_version", serde_json::json!(store.version()));
    out.insert("fragments", serde_json::json!(store.num_fragments()));
    out.insert("disk_bytes", serde_json::json!(bytes));
    if rows > 0 {
        let mean_len = mean_prompt_len(store)?;
        let raw_f16 = 2.0 * (latent_numel as f64 + mean_len * c.text_hidden_size as f64);
        let per = bytes as f64 / rows as f64;
        out.insert("bytes_per_sample", serde_json::json!(per.round()));
        out.insert(
            "raw_f16_bytes_per_sample",
            serde_json::json!(raw_f16.round()),
        );
        out.insert(
            "ratio_to_raw_f16",
            serde_json::json!((per / raw_f16 * 1000.0).round() / 1000.0),
        );
        out.insert(
            "mean_prompt_len",
            serde_json::json!((mean_len * 10.0).round() / 10.0),
        );
    }
    if c.multi_scale.is_some() {
        let hist: Vec<serde_json::Value> = bucket_histogram(store)?
            .into_iter()
            .map(|(shape, n)| serde_json::json!({"latent_shape": shape, "rows": n}))
            .collect();
        out.insert("buckets", serde_json::json!(hist));
    }
    out.insert("config", serde_json::to_value(c)?);
    Ok(out)
}

/// Rows per latent shape (`[C, H, W]`), in shape order: the bucket histogram of a multi-scale store (one entry
/// in a square one). Read from the `latent_shape` column, so it is right whatever wrote the rows.
pub fn bucket_histogram(store: &LatentStore) -> Result<Vec<([i32; 3], usize)>> {
    Ok(rows_by_shape(store)?
        .into_iter()
        .map(|(shape, rows)| (shape, rows.len()))
        .collect())
}

/// The row offsets (as `take` addresses rows) of each latent shape, in shape order, offsets ascending.
pub fn rows_by_shape(store: &LatentStore) -> Result<Vec<([i32; 3], Vec<u64>)>> {
    let batches: Vec<RecordBatch> = store
        .runtime()
        .block_on(async {
            let mut scan = store.dataset().scan();
            scan.project(&[columns::LATENT_SHAPE])?;
            scan.try_into_stream().await?.try_collect().await
        })
        .map_err(|e| super::verify::store_error(store.path(), e))?;
    let mut rows: BTreeMap<[i32; 3], Vec<u64>> = BTreeMap::new();
    let mut offset = 0u64;
    for b in &batches {
        let shapes =
            column::<arrow_array::FixedSizeListArray>(store.path(), b, columns::LATENT_SHAPE)?;
        for i in 0..shapes.len() {
            let row = shapes.value(i);
            let v = row.as_any().downcast_ref::<Int32Array>().ok_or_else(|| {
                crate::error::Error::store(store.path(), "latent_shape does not hold int32 values")
            })?;
            rows.entry([v.value(0), v.value(1), v.value(2)])
                .or_default()
                .push(offset);
            offset += 1;
        }
    }
    Ok(rows.into_iter().collect())
}

fn mean_prompt_len(store: &LatentStore) -> Result<f64> {
    let batches: Vec<RecordBatch> = store
        .runtime()
        .block_on(async {
            let mut scan = store.dataset().scan();
            scan.project(&[columns::PROMPT_LEN])?;
            scan.try_into_stream().await?.try_collect().await
        })
        .map_err(|e| super::verify::store_error(store.path(), e))?;
    let (mut sum, mut n) = (0f64, 0usize);
    for b in &batches {
        let a = column::<Int32Array>(store.path(), b, columns::PROMPT_LEN)?;
        sum += a.values().iter().map(|&v| v as f64).sum::<f64>();
        n += a.len();
    }
    Ok(if n == 0 { 0.0 } else { sum / n as f64 })
}
