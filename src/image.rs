//! Image decoding and preprocessing exactly as the reference transform (PIL convert("RGB") + torchvision).
//!
//! The reference reads `Image.open(BytesIO(bytes)).convert("RGB")`, then applies torchvision
//! `Resize(res)` (PIL's antialiased BILINEAR resample), `CenterCrop(res)`, `ToTensor` and
//! `Normalize(0.5, 0.5)`. [`decode_rgb`] reproduces PIL's mode handling and [`preprocess`] reproduces
//! Pillow 13's `ImagingResample` (separable passes in Pillow's order, support scaled by the downscale
//! factor, 22-bit fixed-point coefficients, uint8 rounding between the passes), so that decoded
//! PNG/WebP-lossless pixels give bit-identical tensors.
//!
//! The multi-scale transform of aspect-ratio buckets (NVlabs Sana's: resize to cover the bucket with BICUBIC,
//! or LANCZOS at 2048 px, then `CenterCrop((h, w))`) runs on the same resampler with the other filters
//! ([`resize_center_crop_to`], [`preprocess_bucket_into`]; buckets in [`crate::buckets`]).

use std::io::Cursor;
use std::ops::Range;
use std::path::PathBuf;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// Pillow's `Image.MAX_IMAGE_PIXELS`; PIL refuses images over twice this (DecompressionBombError).
const PIL_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Bits of fraction in Pillow's fixed-point resampling coefficients (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

fn bad_image(msg: impl Into<String>) -> Error {
    Error::data(PathBuf::from("<image bytes>"), msg)
}

/// Decode encoded image bytes (PNG, JPEG incl. CMYK/Adobe, WebP) to 8-bit RGB with PIL's
/// `Image.open(...).convert("RGB")` semantics: grey replicated, alpha dropped (not composited), palette
/// expanded (transparency ignored), 16-bit RGB/RGBA/LA samples reduced to their high byte, 16-bit grey
/// (PIL mode `I;16`) clipped to 255, CMYK converted with PIL's `cmyk2rgb`; EXIF orientation and ICC
/// profiles are ignored as PIL does here.
///
/// Errors are [`Error::Data`] with a short stable reason: "empty image bytes", "unsupported image
/// format", "truncated image: ...", "corrupt image: ...", "image too large: ...".
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(bad_image("empty image bytes"));
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Ok(other) => {
            return Err(bad_image(format!(
                "unsupported image format: {}",
                other.extensions_str().first().unwrap_or(&"?")
            )))
        }
        Err(_) => return Err(bad_image("unsupported image format")),
    };
    // zune-jpeg fills a truncated scan with grey; PIL raises "image file is truncated" instead.
    if format == ImageFormat::Jpeg && !jpeg_reaches_end_marker(bytes) {
        return Err(bad_image(
            "truncated image: JPEG has no end-of-image marker",
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.no_limits();
    let decoder = reader
        .into_decoder()
        .map_err(|e| bad_image(format!("corrupt image: {e}")))?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > 2 * PIL_MAX_IMAGE_PIXELS {
        return Err(bad_image(format!(
            "image too large: {width}x{height} pixels (PIL's limit is {})",
            2 * PIL_MAX_IMAGE_PIXELS
        )));
    }
    let decoded = DynamicImage::from_decoder(decoder)
        .map_err(|e| bad_image(format!("corrupt image: {e}")))?;
    let png_grey16 = format == ImageFormat::Png && png_is_grey16(bytes);
    Ok(to_pil_rgb(decoded, png_grey16))
}

/// True for a PNG whose IHDR says 16-bit greyscale without alpha: PIL opens it as mode `I;16`.
fn png_is_grey16(bytes: &[u8]) -> bool {
    // signature (8) + chunk length (4) + "IHDR" (4) + width (4) + height (4), then bit depth, colour type
    bytes.len() > 25 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == 0
}

/// PIL's `convert("RGB")` from whatever the decoder produced.
fn to_pil_rgb(img: DynamicImage, png_grey16: bool) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let grey = |values: Vec<u8>| {
        let rgb = values.into_iter().flat_map(|v| [v, v, v]).collect();
        RgbImage::from_raw(w, h, rgb).expect("buffer sized from the image")
    };
    // PIL's I16_RGB: a 16-bit sample passes through when it fits in a byte, otherwise saturates
    let clip16 = |v: u16| u8::try_from(v).unwrap_or(u8::MAX);
    let high_byte = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => {
            let rgb = rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
            RgbImage::from_raw(w, h, rgb).expect("buffer sized from the image")
        }
        DynamicImage::ImageLuma8(l) => grey(l.into_raw()),
        DynamicImage::ImageLumaA8(la) => grey(la.pixels().map(|p| p[0]).collect()),
        // a tRNS chunk on a 16-bit grey PNG makes the decoder add alpha; PIL still sees I;16
        DynamicImage::ImageLuma16(l) if png_grey16 => {
            grey(l.pixels().map(|p| clip16(p[0])).collect())
        }
        DynamicImage::ImageLumaA16(la) if png_grey16 => {
            grey(la.pixels().map(|p| clip16(p[0])).collect())
        }
        DynamicImage::ImageLuma16(l) => grey(l.pixels().map(|p| high_byte(p[0])).collect()),
        DynamicImage::ImageLumaA16(la) => grey(la.pixels().map(|p| high_byte(p[0])).collect()),
        DynamicImage::ImageRgb16(rgb) => {
            let v = rgb.into_raw().into_iter().map(high_byte).collect();
            RgbImage::from_raw(w, h, v).expect("buffer sized from the image")
        }
        DynamicImage::ImageRgba16(rgba) => {
            let v = rgba
                .pixels()
                .flat_map(|p| [p[0], p[1], p[2]].map(high_byte))
                .collect();
            RgbImage::from_raw(w, h, v).expect("buffer sized from the image")
        }
        other => other.to_rgb8(),
    }
}

/// Walk the JPEG marker segments and entropy-coded data; true when an EOI marker is reached.
/// PIL (libjpeg) fails with "image file is truncated" on any stream that ends before EOI.
fn jpeg_reaches_end_marker(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 1 < b.len() {
        if b[i] != 0xFF {
            i += 1; // entropy-coded data
            continue;
        }
        match b[i + 1] {
            0xD9 => return true,
            0x00 | 0xFF => i += 1,        // stuffed zero or fill byte
            0x01 | 0xD0..=0xD7 => i += 2, // TEM, RSTn: no length field
            _ if i + 3 < b.len() => i += 2 + usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]])),
            _ => return false,
        }
    }
    false
}

/// torchvision `Resize(res)` output size `(width, height)`: the shorter side becomes `res`, the longer
/// `int(res * long / short)` (truncated).
pub fn resized_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (f64::from(resolution) * f64::from(long) / f64::from(short)) as u32;
    if width <= height {
        (resolution, new_long)
    } else {
        (new_long, resolution)
    }
}

/// torchvision `CenterCrop` offset along one axis: `int(round((size - crop) / 2))`, ties to even.
fn center_crop_offset(size: u32, crop: u32) -> u32 {
    (f64::from(size - crop) / 2.0).round_ties_even() as u32
}

/// Resampling taps of one axis, as Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.
struct Taps {
    /// first input index and number of inputs, per output index
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point coefficients per output index
    coeffs: Vec<i32>,
    ksize: usize,
}

/// A resampling filter of Pillow's `Image.resize` (its `Resample.c` definitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR`: the triangle, support 1 (the square transform's `Resize`).
    Bilinear,
    /// `Image.BICUBIC`: Keys' cubic with a = -0.5, support 2 (the multi-scale transform up to 1024 px).
    Bicubic,
    /// `Image.LANCZOS`: sinc windowed by sinc(x/3), support 3 (the multi-scale transform at 2048 px).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        let x = x * std::f64::consts::PI;
                        x.sin() / x
                    }
                };
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }

    /// The name PIL and torchvision give it.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Bilinear => "bilinear",
            Filter::Bicubic => "bicubic",
            Filter::Lanczos => "lanczos",
        }
    }
}

impl Taps {
    /// BILINEAR taps (the square transform's).
    #[cfg(test)]
    fn bilinear(in_size: u32, out_size: u32, first: u32, count: u32) -> Self {
        Taps::new(Filter::Bilinear, in_size, out_size, first, count)
    }

    /// `filter` over the box `[0, in_size)` resampled to `out_size` samples; taps of the outputs
    /// `first..first + count` only (each output's taps depend on its own index alone).
    fn new(filter: Filter, in_size: u32, out_size: u32, first: u32, count: u32) -> Self {
        // Pillow passes the box as C floats and computes in doubles
        let (in0, in1) = (0f32, in_size as f32);
        let scale = f64::from(in1 - in0) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(count as usize);
        let mut coeffs = vec![0i32; count as usize * ksize];
        let mut weights = vec![0f64; ksize];
        for (i, k) in coeffs.chunks_exact_mut(ksize).enumerate() {
            let xx = f64::from(first) + i as f64;
            let center = f64::from(in0) + (xx + 0.5) * scale;
            // C's (int) truncates toward zero before the clamp
            let xmin = ((center - support + 0.5) as i32).max(0);
            let xmax = ((center + support + 0.5) as i32).min(in_size as i32);
            let taps = (xmax - xmin).max(0) as usize;
            let mut total = 0.0;
            for (x, w) in weights[..taps].iter_mut().enumerate() {
                let t = ((x as i32 + xmin) as f64 - center + 0.5) * inv_filterscale;
                *w = filter.weight(t);
                total += *w;
            }
            for (kx, &w) in k.iter_mut().zip(&weights[..taps]) {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *kx = if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            bounds.push((xmin as usize, taps));
        }
        Taps {
            bounds,
            coeffs,
            ksize,
        }
    }

    /// First input index and coefficients of the `i`-th output of the computed range.
    fn of(&self, i: usize) -> (usize, &[i32]) {
        let (start, count) = self.bounds[i];
        (start, &self.coeffs[i * self.ksize..][..count])
    }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift) and saturate to a byte.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

/// Input range read by a pass's taps (all outputs of the computed range).
fn taps_span(taps: &Taps) -> Range<usize> {
    let (first, _) = taps.bounds[0];
    let (last, count) = taps.bounds[taps.bounds.len() - 1];
    first..last + count
}

/// Horizontal pass over every row of `data` (rows of `stride` pixels whose first pixel is input column
/// `x_origin`): output columns `cols` of the resampled row, or a plain copy of them without taps.
fn horizontal_pass(
    data: &[u8],
    stride: usize,
    x_origin: usize,
    taps: Option<&Taps>,
    cols: Range<usize>,
) -> Vec<u8> {
    let width = cols.len();
    let mut out = vec![0u8; data.len() / stride * width];
    for (in_row, out_row) in data
        .chunks_exact(stride * 3)
        .zip(out.chunks_exact_mut(width * 3))
    {
        let Some(taps) = taps else {
            out_row.copy_from_slice(&in_row[(cols.start - x_origin) * 3..][..width * 3]);
            continue;
        };
        for (xx, out_px) in out_row.chunks_exact_mut(3).enumerate() {
            let (start, k) = taps.of(xx);
            let (mut r, mut g, mut b) = (ROUNDING, ROUNDING, ROUNDING);
            for (px, &c) in in_row[(start - x_origin) * 3..].chunks_exact(3).zip(k) {
                r += i32::from(px[0]) * c;
                g += i32::from(px[1]) * c;
                b += i32::from(px[2]) * c;
            }
            out_px.copy_from_slice(&[clip8(r), clip8(g), clip8(b)]);
        }
    }
    out
}

/// Vertical pass over the columns `cols` of `data` (rows of `stride` pixels, first row = input row
/// `y_origin`): output rows `rows` of the resampled columns, or a plain copy of them without taps.
fn vertical_pass(
    data: &[u8],
    stride: usize,
    cols: Range<usize>,
    y_origin: usize,
    taps: Option<&Taps>,
    rows: Range<usize>,
) -> Vec<u8> {
    let width = cols.len() * 3;
    let row = |y: usize| &data[(y - y_origin) * stride * 3 + cols.start * 3..][..width];
    let mut out = vec![0u8; rows.len() * width];
    let mut acc = vec![0i32; width];
    for (yy, out_row) in out.chunks_exact_mut(width).enumerate() {
        let Some(taps) = taps else {
            out_row.copy_from_slice(row(rows.start + yy));
            continue;
        };
        // integer sums are order-independent, so accumulate whole rows at a time
        let (start, k) = taps.of(yy);
        acc.fill(ROUNDING);
        for (dy, &c) in k.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(row(start + dy)) {
                *a += i32::from(v) * c;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// A window `[x0, x0 + w) x [y0, y0 + h)` of PIL's `img.resize((out_w, out_h), filter)`.
/// Every output pixel depends only on its own taps, so the window equals the same crop of the full
/// resize; computing only the window saves the columns and rows the centre crop discards.
fn resize_window(
    img: &RgbImage,
    filter: Filter,
    (out_w, out_h): (u32, u32),
    (x0, y0, w, h): (u32, u32, u32, u32),
) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let src = img.as_raw();
    let cols = x0 as usize..(x0 + w) as usize;
    let rows = y0 as usize..(y0 + h) as usize;
    // Pillow skips a pass whose size does not change
    let horizontal = (out_w != in_w).then(|| Taps::new(filter, in_w, out_w, x0, w));
    let vertical = (out_h != in_h).then(|| Taps::new(filter, in_h, out_h, y0, h));
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice the width;
    // the uint8 rounding between the passes makes the order visible in the result.
    let shrink_h = i64::from(in_h) - i64::from(out_h);
    let shrink_w = i64::from(in_w) - i64::from(out_w);
    let stride = in_w as usize;
    let out = if shrink_h > 0 && shrink_h > 2 * shrink_w {
        let needed = horizontal.as_ref().map_or(cols.clone(), taps_span);
        let temp = vertical_pass(src, stride, needed.clone(), 0, vertical.as_ref(), rows);
        horizontal_pass(&temp, needed.len(), needed.start, horizontal.as_ref(), cols)
    } else {
        let needed = vertical.as_ref().map_or(rows.clone(), taps_span);
        let band = &src[needed.start * stride * 3..needed.end * stride * 3];
        let temp = horizontal_pass(band, stride, 0, horizontal.as_ref(), cols);
        vertical_pass(
            &temp,
            w as usize,
            0..w as usize,
            needed.start,
            vertical.as_ref(),
            rows,
        )
    };
    RgbImage::from_raw(w, h, out).expect("window-sized buffer")
}

/// `Resize(res)` + `CenterCrop(res)` on an RGB image: the `res x res` uint8 crop, bit-exact with
/// PIL + torchvision. (Resize makes the shorter side exactly `res`, so CenterCrop never pads.)
pub fn resize_center_crop(img: &RgbImage, resolution: u32) -> RgbImage {
    assert!(resolution > 0, "resolution must be positive");
    let (in_w, in_h) = img.dimensions();
    let (out_w, out_h) = resized_size(in_w, in_h, resolution);
    let left = center_crop_offset(out_w, resolution);
    let top = center_crop_offset(out_h, resolution);
    resize_window(
        img,
        Filter::Bilinear,
        (out_w, out_h),
        (left, top, resolution, resolution),
    )
}

/// The size NVlabs' multi-scale transform resizes a `width x height` image to before cropping it to a bucket of
/// `bucket_h x bucket_w`, as `(width, height)`: the scale that makes the image cover the bucket, the other side
/// truncated (`int(w * th / h)` in Python's float arithmetic).
pub fn bucket_resize_size(width: u32, height: u32, bucket_h: u32, bucket_w: u32) -> (u32, u32) {
    let (w, h, th, tw) = (
        f64::from(width),
        f64::from(height),
        f64::from(bucket_h),
        f64::from(bucket_w),
    );
    if th / h > tw / w {
        (((w * th) / h) as u32, bucket_h)
    } else {
        (bucket_w, ((h * tw) / w) as u32)
    }
}

/// NVlabs' multi-scale transform up to the tensor conversion: `Resize((rh, rw), filter)` to
/// [`bucket_resize_size`] and `CenterCrop((bucket_h, bucket_w))`, the `bucket_w x bucket_h` uint8 crop,
/// bit-exact with PIL + torchvision.
pub fn resize_center_crop_to(
    img: &RgbImage,
    (bucket_h, bucket_w): (u32, u32),
    filter: Filter,
) -> RgbImage {
    assert!(
        bucket_h > 0 && bucket_w > 0,
        "bucket sizes must be positive"
    );
    let (in_w, in_h) = img.dimensions();
    let (out_w, out_h) = bucket_resize_size(in_w, in_h, bucket_h, bucket_w);
    // the resize covers the bucket, so the crop never pads
    let left = center_crop_offset(out_w.max(bucket_w), bucket_w);
    let top = center_crop_offset(out_h.max(bucket_h), bucket_h);
    resize_window(img, filter, (out_w, out_h), (left, top, bucket_w, bucket_h))
}

/// The multi-scale transform of an RGB image into `out` (CHW f32 in [-1, 1], `3 * bucket_h * bucket_w`
/// values): [`resize_center_crop_to`], `ToTensor`, `Normalize(0.5, 0.5)`.
pub fn preprocess_bucket_into(img: &RgbImage, bucket: (u32, u32), filter: Filter, out: &mut [f32]) {
    let crop = resize_center_crop_to(img, bucket, filter);
    chw_normalized(&crop, out);
}

/// `ToTensor` + `Normalize(0.5, 0.5)` of an RGB crop into `out` (CHW).
fn chw_normalized(crop: &RgbImage, out: &mut [f32]) {
    let plane = (crop.width() * crop.height()) as usize;
    assert_eq!(out.len(), 3 * plane, "output must hold 3 x h x w values");
    let lut: [f32; 256] = std::array::from_fn(|v| normalized(v as u8));
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in crop.as_raw().chunks_exact(3).enumerate() {
        r[i] = lut[px[0] as usize];
        g[i] = lut[px[1] as usize];
        b[i] = lut[px[2] as usize];
    }
}

/// `ToTensor` + `Normalize(0.5, 0.5)` of one byte, in torch's f32 arithmetic: `(v / 255 - 0.5) / 0.5`.
fn normalized(v: u8) -> f32 {
    (f32::from(v) / 255.0 - 0.5) / 0.5
}

/// The reference transform of an RGB image, written into `out` (CHW f32 in [-1, 1], `3 * res * res`
/// values); for filling one slot of a batch buffer without another allocation.
pub fn preprocess_into(img: &RgbImage, resolution: u32, out: &mut [f32]) {
    let plane = (resolution * resolution) as usize;
    assert_eq!(
        out.len(),
        3 * plane,
        "output must hold 3 x res x res values"
    );
    chw_normalized(&resize_center_crop(img, resolution), out);
}

/// The reference transform of an RGB image: `Resize(res)`, `CenterCrop(res)`, `ToTensor`,
/// `Normalize(0.5, 0.5)`, as CHW f32 in [-1, 1] (`3 * res * res` values).
pub fn preprocess(img: &RgbImage, resolution: u32) -> Vec<f32> {
    let mut out = vec![0f32; 3 * (resolution * resolution) as usize];
    preprocess_into(img, resolution, &mut out);
    out
}

/// Decode encoded image bytes and apply the reference transform ([`decode_rgb`] + [`preprocess`]).
pub fn load_preprocessed(bytes: &[u8], resolution: u32) -> Result<Vec<f32>> {
    Ok(preprocess(&decode_rgb(bytes)?, resolution))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_follows_torchvision() {
        assert_eq!(resized_size(37, 23, 16), (25, 16));
        assert_eq!(resized_size(20, 90, 32), (32, 144));
        assert_eq!(resized_size(1024, 1024, 512), (512, 512));
        assert_eq!(resized_size(1456, 816, 1024), (1827, 1024));
    }

    #[test]
    fn crop_offset_rounds_half_to_even() {
        assert_eq!(center_crop_offset(25, 16), 4); // 4.5 -> 4
        assert_eq!(center_crop_offset(27, 16), 6); // 5.5 -> 6
        assert_eq!(center_crop_offset(26, 16), 5);
        assert_eq!(center_crop_offset(16, 16), 0);
    }

    #[test]
    fn taps_sum_to_one_and_cover_the_support() {
        for (inp, out) in [(300, 64), (20, 32), (17, 17), (1000, 999), (7, 1)] {
            let taps = Taps::bilinear(inp, out, 0, out);
            for o in 0..out as usize {
                let (start, k) = taps.of(o);
                assert!(start + k.len() <= inp as usize);
                let sum: i64 = k.iter().map(|&c| i64::from(c)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{inp}->{out} @{o}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(53, 31, image::Rgb([10, 128, 255]));
        for res in [8, 31, 64] {
            let crop = resize_center_crop(&img, res);
            assert!(crop.pixels().all(|p| p.0 == [10, 128, 255]), "res {res}");
        }
    }

    #[test]
    fn jpeg_end_marker_walk() {
        // SOI, APP0 with length 4 holding a fake EOI, SOS header, data with a stuffed FF00 and RST0, EOI
        let ok = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xFF, 0xD9, 0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF,
            0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xD9,
        ];
        assert!(jpeg_reaches_end_marker(&ok));
        assert!(!jpeg_reaches_end_marker(&ok[..ok.len() - 2]));
        assert!(!jpeg_reaches_end_marker(&ok[..8]));
    }
}
