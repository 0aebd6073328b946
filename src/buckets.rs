//! Aspect-ratio buckets: the multi-scale training table of SANA (and PixArt before it) and the nearest bucket
//! of an image, as NVlabs Sana's multi-scale dataset picks it.
//!
//! Keys are height/width ratios written as in the original table; a bucket is `[height, width]` in pixels. The
//! 512 table is the base; 1024 doubles every size and 2048 quadruples it (every size a multiple of 32, so every
//! latent of the 32× DC-AE is whole). An image of `h x w` goes to the first key, in table order, that minimises
//! `|key - h / w|` (Python's `min` over the keys, in f64). See README "Aspect-ratio buckets".

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::Filter;

/// The 512 px table: (key, height, width).
const TABLE_512: [(&str, u32, u32); 40] = [
    ("0.25", 256, 1024),
    ("0.26", 256, 992),
    ("0.27", 256, 960),
    ("0.28", 256, 928),
    ("0.32", 288, 896),
    ("0.33", 288, 864),
    ("0.35", 288, 832),
    ("0.4", 320, 800),
    ("0.42", 320, 768),
    ("0.48", 352, 736),
    ("0.5", 352, 704),
    ("0.52", 352, 672),
    ("0.57", 384, 672),
    ("0.6", 384, 640),
    ("0.68", 416, 608),
    ("0.72", 416, 576),
    ("0.78", 448, 576),
    ("0.82", 448, 544),
    ("0.88", 480, 544),
    ("0.94", 480, 512),
    ("1.0", 512, 512),
    ("1.07", 512, 480),
    ("1.13", 544, 480),
    ("1.21", 544, 448),
    ("1.29", 576, 448),
    ("1.38", 576, 416),
    ("1.46", 608, 416),
    ("1.67", 640, 384),
    ("1.75", 672, 384),
    ("2.0", 704, 352),
    ("2.09", 736, 352),
    ("2.4", 768, 320),
    ("2.5", 800, 320),
    ("2.89", 832, 288),
    ("3.0", 864, 288),
    ("3.11", 896, 288),
    ("3.62", 928, 256),
    ("3.75", 960, 256),
    ("3.88", 992, 256),
    ("4.0", 1024, 256),
];

/// The index of the first of `keys` (height/width ratios, in table order) minimising `|key - height / width|`:
/// Python's `min(keys, key=lambda r: abs(float(r) - h / w))`, as NVlabs' `get_closest_ratio` and diffusers'
/// `classify_height_width_bin` pick.
pub fn nearest_key(keys: impl IntoIterator<Item = f64>, height: f64, width: f64) -> usize {
    let ratio = height / width;
    let mut best = (0, f64::INFINITY);
    for (i, key) in keys.into_iter().enumerate() {
        let d = (key - ratio).abs();
        if d < best.1 {
            best = (i, d);
        }
    }
    best.0
}

/// The resolutions that have a table.
pub const SUPPORTED: [u32; 3] = [512, 1024, 2048];

/// A bucket: the pixel size every image of it is cropped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bucket {
    pub height: u32,
    pub width: u32,
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

/// One table of buckets.
#[derive(Debug, Clone)]
pub struct BucketTable {
    resolution: u32,
    entries: Vec<(&'static str, f64, Bucket)>,
}

impl BucketTable {
    /// The table of `resolution` (512, 1024 or 2048); any other is refused with the supported list.
    pub fn for_resolution(resolution: u32) -> Result<Self> {
        let factor = match resolution {
            512 => 1,
            1024 => 2,
            2048 => 4,
            other => {
                return Err(Error::Arg(format!(
                    "--multi_scale has aspect-ratio tables for --resolution {} only, not {other}",
                    SUPPORTED.map(|r| r.to_string()).join(", ")
                )))
            }
        };
        let entries = TABLE_512
            .iter()
            .map(|&(key, h, w)| {
                let ratio: f64 = key.parse().expect("table keys are numbers");
                (
                    key,
                    ratio,
                    Bucket {
                        height: h * factor,
                        width: w * factor,
                    },
                )
            })
            .collect();
        Ok(BucketTable {
            resolution,
            entries,
        })
    }

    pub fn resolution(&self) -> u32 {
        self.resolution
    }

    /// `(key, bucket)` in table order.
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, Bucket)> + '_ {
        self.entries.iter().map(|&(k, _, b)| (k, b))
    }

    /// The index (in table order) and bucket of an image of `height x width`: the first key minimising
    /// `|key - height / width|`.
    pub fn nearest(&self, height: u32, width: u32) -> (usize, Bucket) {
        let best = nearest_key(
            self.entries.iter().map(|&(_, key, _)| key),
            f64::from(height),
            f64::from(width),
        );
        (best, self.entries[best].2)
    }

    /// The key of the bucket at `index` ("1.0", "0.57", …).
    pub fn key(&self, index: usize) -> &'static str {
        self.entries[index].0
    }

    /// The resampling filter of the multi-scale transform at this resolution: BICUBIC, LANCZOS at 2048.
    pub fn filter(&self) -> Filter {
        if self.resolution >= 2048 {
            Filter::Lanczos
        } else {
            Filter::Bicubic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_scale_the_512_table_and_refuse_other_resolutions() {
        let t = BucketTable::for_resolution(1024).unwrap();
        assert_eq!(t.entries().count(), 40);
        for (k, b) in t.entries() {
            assert_eq!((b.height % 32, b.width % 32), (0, 0), "{k}");
        }
        assert_eq!(
            t.nearest(1024, 1024).1,
            Bucket {
                height: 1024,
                width: 1024
            }
        );
        let err = BucketTable::for_resolution(768).unwrap_err().to_string();
        assert!(err.contains("512, 1024, 2048"), "{err}");
        assert_eq!(
            BucketTable::for_resolution(2048).unwrap().filter(),
            Filter::Lanczos
        );
    }
}
