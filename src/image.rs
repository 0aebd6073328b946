//! Image decoding and preprocessing exactly as the reference transform (PIL convert("RGB") + torchvision).
//!
//! The reference reads `Image.open(BytesIO(bytes)).convert("RGB")`, then applies torchvision
//! `Resize(res)` (PIL's antialiased BILINEAR resample), `CenterCrop(res)`, `ToTensor` and
//! `Normalize(0.5, 0.5)`. [`decode_rgb`] reproduces PIL's mode handling and [`preprocess`] reproduces
//! Pillow 13's `ImagingResample` (separable passes in Pillow's order, support scaled by the downscale
//! factor, 22-bit fixed-point coefficients, uint8 rounding between the passes), so that decoded
//! PNG/WebP-lossless/GIF/BMP/TIFF pixels give bit-identical tensors.
//!
//! The multi-scale transform of aspect-ratio buckets (NVlabs Sana's: resize to cover the bucket with BICUBIC,
//! or LANCZOS at 2048 px, then `CenterCrop((h, w))`) runs on the same resampler with the other filters
//! ([`resize_center_crop_to`], [`preprocess_bucket_into`]; buckets in [`crate::buckets`]).

use std::borrow::Cow;
use std::io::Cursor;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use image::metadata::Orientation;
use image::{
    DynamicImage, GenericImageView, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage,
};

use crate::{Error, Result};

/// Pillow's `Image.MAX_IMAGE_PIXELS`; PIL refuses images over twice this (DecompressionBombError).
const PIL_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The pixel count above which [`decode_rgb`] refuses an image: the point at which PIL's `Image.open` raises
/// `DecompressionBombError` (twice `Image.MAX_IMAGE_PIXELS`).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 2 * PIL_MAX_IMAGE_PIXELS;

/// Bits of fraction in Pillow's fixed-point resampling coefficients (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

fn bad_image(msg: impl Into<String>) -> Error {
    Error::data(PathBuf::from("<image bytes>"), msg)
}

fn unsupported(what: impl std::fmt::Display) -> Error {
    bad_image(format!("unsupported image format: {what}"))
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    bad_image(format!("corrupt image: {what}"))
}

/// An error of the `image` crate: a feature it lacks is an unsupported format, anything else corruption.
fn crate_error(e: ImageError) -> Error {
    match e {
        ImageError::Unsupported(e) => unsupported(e),
        e => corrupt(e),
    }
}

/// Decode encoded image bytes (PNG, JPEG incl. CMYK/Adobe, WebP, GIF, BMP, TIFF) to 8-bit RGB with PIL's
/// `Image.open(...).convert("RGB")` semantics: grey replicated, alpha dropped (not composited), palette
/// expanded (transparency ignored, indices past the palette black), 16-bit RGB/RGBA/LA samples reduced to
/// their high byte, 16-bit grey (PIL mode `I;16`) clipped to 255, CMYK converted with PIL's `cmyk2rgb`. EXIF
/// orientation and ICC profiles are ignored as PIL does here, except for TIFF, whose Orientation tag Pillow
/// applies when loading. GIF gives its first frame as PIL does (the logical screen, grown to hold the frame,
/// outside the frame the transparent index or index 0).
///
/// Images over [`DEFAULT_MAX_IMAGE_PIXELS`] are refused from their header, before any pixel buffer exists
/// ([`decode_rgb_limited`] takes another limit). Errors are [`Error::Data`] with a short stable reason:
/// "empty image bytes", "unsupported image format", "truncated image: ...", "corrupt image: ...",
/// "image too large: ...".
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    decode_rgb_limited(bytes, DEFAULT_MAX_IMAGE_PIXELS)
}

/// [`decode_rgb`] refusing images of more than `max_pixels` pixels ("image too large: ..."); the size is
/// read from the header and checked before anything is decoded or allocated for the pixels.
///
/// A panic inside a decoder is caught and returned as "corrupt image: decoder panicked".
pub fn decode_rgb_limited(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let format = sniff(bytes)?;
    guarded(|| match format {
        ImageFormat::Gif => {
            let header = GifHeader::parse(bytes)?;
            check_size(header.size, max_pixels)?;
            header.decode(bytes)
        }
        ImageFormat::Bmp => {
            let header = BmpHeader::parse(bytes)?;
            check_size((header.width, header.height), max_pixels)?;
            header.decode(bytes)
        }
        ImageFormat::Tiff => {
            let header = TiffHeader::parse(bytes)?;
            check_size(header.decoded_size(), max_pixels)?;
            header.decode(bytes)
        }
        ImageFormat::Jpeg => decode_jpeg(bytes, max_pixels),
        _ => decode_with_crate(bytes, format, max_pixels),
    })
}

/// JPEG through libjpeg-turbo's decoder (the `mozjpeg` build of it), with PIL's settings — accurate integer
/// IDCT, fancy chroma upsampling, its colour conversion — so that pixels are bit-identical to
/// `Image.open(...).convert("RGB")`. CMYK and YCCK files come out as CMYK, inverted when an Adobe APP14 marker
/// says so (PIL's `CMYK;I` raw mode), then PIL's `cmyk2rgb`. Decoder errors are panics in the binding: the
/// caller's guard turns them into "corrupt image" errors.
fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    use mozjpeg::ColorSpace;
    // libjpeg fills a truncated scan with grey and warns; PIL raises "image file is truncated" instead.
    if !jpeg_reaches_end_marker(bytes) {
        return Err(bad_image(
            "truncated image: JPEG has no end-of-image marker",
        ));
    }
    let corrupt_io = |e: std::io::Error| corrupt(e.to_string());
    let decoder = mozjpeg::Decompress::new_mem(bytes).map_err(corrupt_io)?;
    let (w, h) = decoder.size();
    let (width, height) = (
        u32::try_from(w).map_err(|_| corrupt("width out of range"))?,
        u32::try_from(h).map_err(|_| corrupt("height out of range"))?,
    );
    check_size((width, height), max_pixels)?;
    let rgb: Vec<u8> = match decoder.color_space() {
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let inverted = jpeg_has_adobe_marker(bytes);
            let mut started = decoder
                .to_colorspace(ColorSpace::JCS_CMYK)
                .map_err(corrupt_io)?;
            let cmyk: Vec<[u8; 4]> = started.read_scanlines().map_err(corrupt_io)?;
            started.finish().map_err(corrupt_io)?;
            cmyk.into_iter()
                .flat_map(|p| cmyk2rgb(if inverted { p.map(|v| 255 - v) } else { p }))
                .collect()
        }
        _ => {
            let mut started = decoder.rgb().map_err(corrupt_io)?;
            let px: Vec<[u8; 3]> = started.read_scanlines().map_err(corrupt_io)?;
            started.finish().map_err(corrupt_io)?;
            px.into_iter().flatten().collect()
        }
    };
    RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| corrupt("fewer scanlines than the header says"))
}

/// Whether a JPEG carries an Adobe APP14 segment (PIL then reads CMYK samples inverted).
fn jpeg_has_adobe_marker(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 3 < b.len() && b[i] == 0xFF {
        let marker = b[i + 1];
        if marker == 0xDA {
            return false; // start of scan: no more header segments
        }
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        if marker == 0xEE && b.get(i + 4..i + 9) == Some(b"Adobe") {
            return true;
        }
        i += 2 + len;
    }
    false
}

/// The `(width, height)` [`decode_rgb`] would return for these bytes, read from the header alone (no pixel is
/// decoded), so that a caller can budget memory before decoding. A GIF's size is PIL's: the logical screen
/// grown to hold the first frame; a TIFF's is after its Orientation tag (width and height swapped for 5-8).
pub fn declared_pixels(bytes: &[u8]) -> Result<(u32, u32)> {
    let format = sniff(bytes)?;
    guarded(|| match format {
        ImageFormat::Gif => Ok(GifHeader::parse(bytes)?.size),
        ImageFormat::Bmp => BmpHeader::parse(bytes).map(|h| (h.width, h.height)),
        ImageFormat::Tiff => Ok(TiffHeader::parse(bytes)?.decoded_size()),
        ImageFormat::Jpeg => {
            // the header as the decoder that will decode it reads it
            let d = mozjpeg::Decompress::new_mem(bytes).map_err(|e| corrupt(e.to_string()))?;
            let (w, h) = d.size();
            Ok((
                u32::try_from(w).map_err(|_| corrupt("width out of range"))?,
                u32::try_from(h).map_err(|_| corrupt("height out of range"))?,
            ))
        }
        _ => Ok(crate_decoder(bytes, format)?.dimensions()),
    })
}

/// The container format, for the formats PIL's reference reads here.
fn sniff(bytes: &[u8]) -> Result<ImageFormat> {
    if bytes.is_empty() {
        return Err(bad_image("empty image bytes"));
    }
    match image::guess_format(bytes) {
        Ok(
            f @ (ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
            | ImageFormat::Tiff),
        ) => Ok(f),
        Ok(other) => Err(unsupported(other.extensions_str().first().unwrap_or(&"?"))),
        Err(_) => Err(bad_image("unsupported image format")),
    }
}

/// Run a decoding step, turning a panic inside a decoder into an error (the crates are not all hardened
/// against malformed input; the process must survive one bad row).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(corrupt("decoder panicked")))
}

/// PIL's decompression-bomb check, on the size read from the header; zero-sized images are refused too.
fn check_size((width, height): (u32, u32), max_pixels: u64) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(corrupt(format!("zero-sized image ({width}x{height})")));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(bad_image(format!(
            "image too large: {width}x{height} pixels (the limit is {max_pixels})"
        )));
    }
    Ok(())
}

fn crate_decoder(bytes: &[u8], format: ImageFormat) -> Result<impl ImageDecoder + '_> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // the pixel limit is ours (PIL's), checked from the header before decoding
    reader.no_limits();
    reader.into_decoder().map_err(crate_error)
}

/// Decode with the `image` crate after checking the header's size (the decoders read only the header here).
fn crate_decode(bytes: &[u8], format: ImageFormat, max_pixels: u64) -> Result<DynamicImage> {
    let decoder = crate_decoder(bytes, format)?;
    check_size(decoder.dimensions(), max_pixels)?;
    DynamicImage::from_decoder(decoder).map_err(crate_error)
}

/// PNG and WebP.
fn decode_with_crate(bytes: &[u8], format: ImageFormat, max_pixels: u64) -> Result<RgbImage> {
    let decoded = crate_decode(bytes, format, max_pixels)?;
    let png_grey16 = format == ImageFormat::Png && png_is_grey16(bytes);
    Ok(to_pil_rgb(decoded, png_grey16))
}

/// True for a PNG whose IHDR says 16-bit greyscale without alpha: PIL opens it as mode `I;16`.
fn png_is_grey16(bytes: &[u8]) -> bool {
    // signature (8) + chunk length (4) + "IHDR" (4) + width (4) + height (4), then bit depth, colour type
    bytes.len() > 25 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == 0
}

/// Bounds-checked little/big-endian reads of a byte string; `None` past its end.
struct Bytes<'a> {
    b: &'a [u8],
    big_endian: bool,
}

impl Bytes<'_> {
    fn slice(&self, at: usize, len: usize) -> Option<&[u8]> {
        self.b.get(at..at.checked_add(len)?)
    }

    fn u8(&self, at: usize) -> Option<u8> {
        self.b.get(at).copied()
    }

    fn u16(&self, at: usize) -> Option<u16> {
        let s: [u8; 2] = self.slice(at, 2)?.try_into().ok()?;
        Some(if self.big_endian {
            u16::from_be_bytes(s)
        } else {
            u16::from_le_bytes(s)
        })
    }

    fn u32(&self, at: usize) -> Option<u32> {
        let s: [u8; 4] = self.slice(at, 4)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(s)
        } else {
            u32::from_le_bytes(s)
        })
    }
}

/// A 256-entry RGB lookup of palette indices as PIL's `P` -> `RGB` conversion: entries past the palette
/// (`rgb` holds `len / 3` of them) are black.
fn palette_lut(rgb: &[u8]) -> [[u8; 3]; 256] {
    let mut lut = [[0u8; 3]; 256];
    for (entry, c) in lut.iter_mut().zip(rgb.chunks_exact(3)) {
        entry.copy_from_slice(c);
    }
    lut
}

// ------------------------------------------------------------------------------------------------------------
// GIF: PIL's GifImagePlugin, frame 0.

/// What PIL's `GifImageFile` reads before decoding the first frame.
struct GifHeader {
    /// PIL's size: the logical screen, grown to hold the first frame when it extends past it.
    size: (u32, u32),
    /// The first frame: left, top, width, height.
    frame: [u32; 4],
    interlaced: bool,
    /// The frame's palette (local, else global) as RGB triples; `None` when there is none or it is the
    /// identity grey ramp, which PIL opens as mode `L` (the indices are the grey levels).
    palette: Option<Vec<u8>>,
    /// The transparent index of the frame's graphic control extension: PIL fills the image with it before
    /// decoding the frame; `convert("RGB")` then ignores transparency.
    transparency: Option<u8>,
    /// The LZW minimum code size byte and the data sub-blocks (through the terminator, or to the end of a
    /// truncated file).
    data: Range<usize>,
}

impl GifHeader {
    fn parse(b: &[u8]) -> Result<Self> {
        let r = Bytes {
            b,
            big_endian: false,
        };
        let truncated = || bad_image("truncated image: GIF ends before its first frame");
        let (screen_w, screen_h, flags) = match (r.u16(6), r.u16(8), r.u8(10)) {
            (Some(w), Some(h), Some(f)) => (u32::from(w), u32::from(h), f),
            _ => return Err(truncated()),
        };
        let mut pos = 13;
        let mut palette = None;
        if flags & 0x80 != 0 {
            let len = 3 << ((flags & 7) + 1);
            palette = gif_palette(r.slice(pos, len).ok_or_else(truncated)?);
            pos += len;
        }
        let mut transparency = None;
        // blocks up to the first image descriptor; PIL skips stray bytes between blocks
        loop {
            match r.u8(pos) {
                None | Some(b';') => return Err(corrupt("GIF holds no image")),
                Some(b'!') => {
                    let label = r.u8(pos + 1).ok_or_else(truncated)?;
                    pos += 2;
                    let mut first = true;
                    loop {
                        let len = usize::from(r.u8(pos).ok_or_else(truncated)?);
                        pos += 1;
                        if len == 0 {
                            break;
                        }
                        let block = r.slice(pos, len).ok_or_else(truncated)?;
                        if first && label == 0xF9 {
                            // graphic control extension: flags, delay (2), transparent index
                            if len < 4 {
                                return Err(corrupt("GIF graphic control extension too short"));
                            }
                            if block[0] & 1 != 0 {
                                transparency = Some(block[3]);
                            }
                        }
                        first = false;
                        pos += len;
                    }
                }
                Some(b',') => break,
                Some(_) => pos += 1,
            }
        }
        let d = r.slice(pos + 1, 9).ok_or_else(truncated)?;
        let field = |i: usize| u32::from(u16::from_le_bytes([d[i], d[i + 1]]));
        let frame = [field(0), field(2), field(4), field(6)];
        let frame_flags = d[8];
        pos += 10;
        if frame_flags & 0x80 != 0 {
            let len = 3 << ((frame_flags & 7) + 1);
            palette = gif_palette(r.slice(pos, len).ok_or_else(truncated)?);
            pos += len;
        }
        if pos >= b.len() {
            return Err(truncated());
        }
        if frame[2] == 0 || frame[3] == 0 {
            // PIL: "tile cannot extend outside image"
            return Err(corrupt("GIF frame is empty"));
        }
        let mut end = pos + 1;
        while let Some(len) = r.u8(end) {
            end += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        let size = (
            screen_w.max(frame[0] + frame[2]),
            screen_h.max(frame[1] + frame[3]),
        );
        Ok(GifHeader {
            size,
            frame,
            interlaced: frame_flags & 0x40 != 0,
            palette,
            transparency,
            data: pos..end.min(b.len()),
        })
    }

    /// The frame's indices, row by row (`frame[2] * frame[3]` of them).
    ///
    /// The `image` crate expands GIF pixels through the palette (and needs one), so it gets the frame alone in a
    /// GIF of its own whose palette is the identity: the red channel of its output is the index. PIL's
    /// semantics (palette lookup, missing entries, background, L mode) are then applied here.
    fn frame_indices(&self, b: &[u8]) -> Result<Vec<u8>> {
        let [_, _, w, h] = self.frame.map(|v| v as u16);
        let mut gif = Vec::with_capacity(13 + 10 + 768 + self.data.len() + 1);
        gif.extend_from_slice(b"GIF89a");
        gif.extend_from_slice(&w.to_le_bytes());
        gif.extend_from_slice(&h.to_le_bytes());
        gif.extend_from_slice(&[0, 0, 0, b',', 0, 0, 0, 0]);
        gif.extend_from_slice(&w.to_le_bytes());
        gif.extend_from_slice(&h.to_le_bytes());
        gif.push(0x87 | if self.interlaced { 0x40 } else { 0 });
        gif.extend((0..=255u8).flat_map(|i| [i, i, i]));
        gif.extend_from_slice(&b[self.data.clone()]);
        gif.push(b';');
        let decoded = crate_decode(&gif, ImageFormat::Gif, u64::MAX)?;
        let (dw, dh) = (decoded.width(), decoded.height());
        if (dw, dh) != (u32::from(w), u32::from(h)) {
            return Err(corrupt(format!("GIF frame decoded as {dw}x{dh}")));
        }
        Ok(decoded.into_rgba8().pixels().map(|p| p[0]).collect())
    }

    fn decode(&self, b: &[u8]) -> Result<RgbImage> {
        let indices = self.frame_indices(b)?;
        let lut = match &self.palette {
            Some(rgb) => palette_lut(rgb),
            None => std::array::from_fn(|i| [i as u8; 3]),
        };
        let (width, height) = self.size;
        let [left, top, fw, fh] = self.frame.map(|v| v as usize);
        let background = lut[usize::from(self.transparency.unwrap_or(0))];
        let mut out = RgbImage::from_pixel(width, height, image::Rgb(background));
        let row_len = width as usize * 3;
        for (y, row) in out.chunks_exact_mut(row_len).enumerate() {
            let Some(frame_row) = y.checked_sub(top).filter(|&fy| fy < fh) else {
                continue;
            };
            let src = &indices[frame_row * fw..][..fw];
            for (px, &idx) in row[left * 3..].chunks_exact_mut(3).zip(src) {
                px.copy_from_slice(&lut[usize::from(idx)]);
            }
        }
        Ok(out)
    }
}

/// A GIF colour table as PIL keeps it: `None` for the identity grey ramp (`_is_palette_needed`).
fn gif_palette(rgb: &[u8]) -> Option<Vec<u8>> {
    let identity = rgb
        .chunks_exact(3)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&v| usize::from(v) == i));
    (!identity).then(|| rgb.to_vec())
}

// ------------------------------------------------------------------------------------------------------------
// BMP: PIL's BmpImagePlugin for the layouts whose `image` crate decoding matches it; the rest is refused.

const BMP_RGB: u32 = 0;
const BMP_RLE8: u32 = 1;
const BMP_RLE4: u32 = 2;
const BMP_BITFIELDS: u32 = 3;

/// The 32-bit BITFIELDS masks (r, g, b, a) PIL reads (all of 8-bit fields); all-zero masks, which PIL reads as
/// BGRA, are not among them (the `image` crate refuses them).
const BMP_MASKS_32: [[u32; 4]; 7] = [
    [0xFF0000, 0xFF00, 0xFF, 0x0],
    [0xFF000000, 0xFF0000, 0xFF00, 0x0],
    [0xFF000000, 0xFF00, 0xFF, 0x0],
    [0xFF000000, 0xFF0000, 0xFF00, 0xFF],
    [0xFF, 0xFF00, 0xFF0000, 0xFF000000],
    [0xFF0000, 0xFF00, 0xFF, 0xFF000000],
    [0xFF000000, 0xFF00, 0xFF, 0xFF0000],
];
const BMP_MASKS_565: [u32; 3] = [0xF800, 0x7E0, 0x1F];
const BMP_MASKS_555: [u32; 3] = [0x7C00, 0x3E0, 0x1F];

/// What PIL's `BmpImageFile._bitmap` reads from the headers.
struct BmpHeader {
    width: u32,
    height: u32,
    bits: u16,
    compression: u32,
    header_size: u32,
    /// The `bfOffBits` of the file header.
    pixel_offset: u32,
    /// Palette entries: the header's count, or `1 << bits`.
    colors: u64,
    /// r, g, b, a masks of a BITFIELDS image.
    masks: Option<[u32; 4]>,
    /// PIL's mode for a palette image: `1` (2 colours, black and white), `L` (identity grey) or `P`.
    palette_mode: Option<char>,
}

impl BmpHeader {
    fn parse(b: &[u8]) -> Result<Self> {
        let r = Bytes {
            b,
            big_endian: false,
        };
        let truncated = || bad_image("truncated image: BMP header ends early");
        let pixel_offset = r.u32(10).ok_or_else(truncated)?;
        let header_size = r.u32(14).ok_or_else(truncated)?;
        let h = 18usize; // header fields after its size
        let header_end = (header_size as usize)
            .checked_add(14)
            .ok_or_else(truncated)?;
        if header_end > b.len() {
            return Err(truncated());
        }
        let field16 = |at: usize| r.u16(h + at).ok_or_else(truncated);
        let field32 = |at: usize| r.u32(h + at).ok_or_else(truncated);
        let (width, height, bits, compression, colors, palette_padding) = match header_size {
            12 => (
                u32::from(field16(0)?),
                u32::from(field16(2)?),
                field16(6)?,
                BMP_RGB,
                0,
                3,
            ),
            40 | 52 | 56 | 64 | 108 | 124 => {
                // PIL reads both sizes unsigned; a height whose top byte is 0xFF is a top-down image
                let raw_height = field32(4)?;
                let height = if raw_height >> 24 == 0xFF {
                    raw_height.wrapping_neg()
                } else {
                    raw_height
                };
                (
                    field32(0)?,
                    height,
                    field16(10)?,
                    field32(12)?,
                    field32(28)?,
                    4,
                )
            }
            n => return Err(unsupported(format!("BMP header of {n} bytes"))),
        };
        let masks = if compression == BMP_BITFIELDS && header_size != 12 {
            Some(if header_size >= 52 {
                let a = if header_size >= 56 { field32(48)? } else { 0 };
                [field32(36)?, field32(40)?, field32(44)?, a]
            } else {
                // after a 40-byte header, three masks follow it
                let m = |i: usize| r.u32(header_end + 4 * i).ok_or_else(truncated);
                [m(0)?, m(1)?, m(2)?, 0]
            })
        } else {
            None
        };
        let colors = if colors == 0 {
            1u64.checked_shl(u32::from(bits)).unwrap_or(0)
        } else {
            u64::from(colors)
        };
        let palette_mode =
            (matches!(bits, 1 | 4 | 8) && (1..=65536).contains(&colors)).then(|| {
                let entry = |i: usize| {
                    b.get(header_end + i * palette_padding..)
                        .and_then(|p| p.get(..3))
                };
                let grey_levels: Vec<usize> = if colors == 2 {
                    vec![0, 255]
                } else {
                    (0..colors as usize).collect()
                };
                let grey = grey_levels.iter().enumerate().all(|(i, &v)| {
                    // the palette is stored BGR(X); a grey entry reads the same either way
                    entry(i).is_some_and(|c| c.iter().all(|&x| usize::from(x) == v))
                });
                match (grey, colors <= 2) {
                    (true, true) => '1',
                    (true, false) => 'L',
                    (false, _) => 'P',
                }
            });
        Ok(BmpHeader {
            width,
            height,
            bits,
            compression,
            header_size,
            pixel_offset,
            colors,
            masks,
            palette_mode,
        })
    }

    /// Refuse what PIL reads differently from the `image` crate (or not at all).
    fn check_supported(&self) -> Result<()> {
        let bits = self.bits;
        match self.compression {
            BMP_RGB => {}
            BMP_RLE8 | BMP_RLE4 => return Err(unsupported("RLE-compressed BMP")),
            BMP_BITFIELDS => {
                let m = self.masks.unwrap_or_default();
                let ok = match bits {
                    32 => BMP_MASKS_32.contains(&m),
                    16 => [BMP_MASKS_565, BMP_MASKS_555].contains(&[m[0], m[1], m[2]]),
                    _ => false,
                };
                if !ok {
                    return Err(unsupported(format!(
                        "{bits}-bit BMP with bit fields {m:#x?}"
                    )));
                }
            }
            c => return Err(unsupported(format!("BMP compression {c}"))),
        }
        if !matches!(bits, 1 | 4 | 8 | 16 | 24 | 32) {
            return Err(unsupported(format!("{bits}-bit BMP")));
        }
        if bits <= 8 {
            if !(1..=1u64 << bits).contains(&self.colors) {
                return Err(unsupported(format!(
                    "{bits}-bit BMP with {} palette entries",
                    self.colors
                )));
            }
            // PIL moves the pixel data past the palette when bfOffBits points at the palette
            if u64::from(self.pixel_offset) == 14 + u64::from(self.header_size) {
                return Err(unsupported("BMP whose pixel offset points at its palette"));
            }
            match self.palette_mode {
                // PIL unpacks these with its 1-bit / 8-bit grey raw modes whatever the bit depth and palette size
                Some('1') if bits != 1 || self.colors != 2 => {
                    return Err(unsupported(format!(
                        "{bits}-bit BMP with a black-and-white palette of {} entries",
                        self.colors
                    )))
                }
                Some('L') if bits != 8 || self.colors != 256 => {
                    return Err(unsupported(format!(
                        "{bits}-bit BMP with a grey palette of {} entries",
                        self.colors
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn decode(&self, b: &[u8]) -> Result<RgbImage> {
        self.check_supported()?;
        let decoded = crate_decode(b, ImageFormat::Bmp, u64::MAX)?;
        if decoded.dimensions() != (self.width, self.height) {
            return Err(corrupt(format!(
                "BMP decoded as {:?}, its header says {}x{}",
                decoded.dimensions(),
                self.width,
                self.height
            )));
        }
        let mut rgb = match decoded {
            DynamicImage::ImageRgb8(rgb) => rgb,
            // 32-bit with an alpha field: PIL's RGBA, whose convert("RGB") drops the alpha
            DynamicImage::ImageRgba8(rgba) => {
                let (w, h) = rgba.dimensions();
                let v = rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
                RgbImage::from_raw(w, h, v).expect("buffer sized from the image")
            }
            other => return Err(corrupt(format!("BMP decoded as {:?}", other.color()))),
        };
        if self.bits == 16 {
            let green_max = if self.masks.is_some_and(|m| m[1] == BMP_MASKS_565[1]) {
                63
            } else {
                31
            };
            let (five, green) = (pil_widening(31), pil_widening(green_max));
            for px in rgb.pixels_mut() {
                px.0 = [
                    five[usize::from(px[0])],
                    green[usize::from(px[1])],
                    five[usize::from(px[2])],
                ];
            }
        }
        Ok(rgb)
    }
}

/// For an n-bit BMP field (`max = 2^n - 1`), PIL's 8-bit value (`v * 255 / max`, truncated) by the `image`
/// crate's (the same rounded to nearest): the crate's values are `255 / max` > 4 apart, so each maps back to
/// its `v`.
fn pil_widening(max: u32) -> [u8; 256] {
    std::array::from_fn(|c| {
        let v = (c as u32 * max + 127) / 255;
        (v * 255 / max) as u8
    })
}

// ------------------------------------------------------------------------------------------------------------
// TIFF: PIL's TiffImagePlugin (OPEN_INFO) for the layouts the `image` crate decodes; the rest is refused.

/// How PIL reads a TIFF layout, for those handled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TiffKind {
    /// 1-bit or 8-bit grey (BlackIsZero or WhiteIsZero, the crate inverts the latter as PIL does), and grey
    /// with an extra sample (dropped).
    Grey8,
    /// 16-bit grey, PIL mode `I;16` / `I;16B`: `convert("RGB")` clips at 255.
    Grey16,
    /// 8-bit RGB, with an unassociated or unspecified extra sample (dropped).
    Rgb8,
    /// 8-bit RGB with associated (premultiplied) alpha: PIL's `RGBa` unpacking divides it out.
    Rgb8Premultiplied,
    /// 16-bit RGB (with an unassociated or unspecified extra sample): the high byte.
    Rgb16,
    /// 1-bit or 8-bit palette: the crate decodes the indices as grey (PhotometricInterpretation patched to
    /// BlackIsZero), looked up in the ColorMap's high bytes as PIL does.
    Palette,
    /// 8-bit CMYK: the crate reads the four samples as RGBA (PhotometricInterpretation patched to RGB); PIL's
    /// `cmyk2rgb` converts them.
    Cmyk8,
}

/// Tags of the first IFD, as PIL reads them.
struct TiffHeader {
    big_endian: bool,
    width: u32,
    height: u32,
    kind: std::result::Result<TiffKind, String>,
    /// Byte offset and type (SHORT or LONG) of the PhotometricInterpretation value, for the patched kinds.
    photometric_at: Option<(usize, u16)>,
    /// ColorMap (3 x 2^bits 16-bit values, all reds then greens then blues) of a palette image.
    colormap: Vec<u16>,
    palette_bits: u16,
    /// EXIF orientation (1-8), applied after decoding as Pillow's TIFF plugin does.
    orientation: Option<Orientation>,
}

/// Compressions read here for every layout: none, LZW, deflate (both codes), PackBits. CCITT Group 4 is read
/// for bilevel images; JPEG, Group 3 and the rest are refused.
const TIFF_COMPRESSIONS: [u32; 5] = [1, 5, 8, 32946, 32773];

/// One IFD entry: tag type, count and the offset of its value (inline or not).
#[derive(Clone, Copy)]
struct IfdEntry {
    typ: u16,
    count: u32,
    at: usize,
}

impl TiffHeader {
    fn parse(b: &[u8]) -> Result<Self> {
        let r = Bytes {
            b,
            big_endian: b.starts_with(b"MM"),
        };
        let truncated = || bad_image("truncated image: TIFF ends inside its first IFD");
        let ifd = r.u32(4).ok_or_else(truncated)? as usize;
        let n = usize::from(r.u16(ifd).ok_or_else(truncated)?);
        let mut entries = std::collections::BTreeMap::new();
        for i in 0..n {
            let e = ifd + 2 + 12 * i;
            let (tag, typ, count) = match (r.u16(e), r.u16(e + 2), r.u32(e + 4)) {
                (Some(t), Some(ty), Some(c)) => (t, ty, c),
                _ => return Err(truncated()),
            };
            let size = match typ {
                1 | 2 | 6 | 7 => 1u64,
                3 | 8 => 2,
                4 | 9 | 11 => 4,
                5 | 10 | 12 => 8,
                _ => 0, // unknown types: an error only if a tag read here has one
            };
            let len = size * u64::from(count);
            let at = if len <= 4 {
                e + 8
            } else {
                r.u32(e + 8).ok_or_else(truncated)? as usize
            };
            // the first occurrence wins
            entries.entry(tag).or_insert(IfdEntry { typ, count, at });
        }
        let values = |tag: u16| -> Result<Option<Vec<u32>>> {
            let Some(e) = entries.get(&tag) else {
                return Ok(None);
            };
            if e.count > 1 << 16 {
                return Err(corrupt(format!("TIFF tag {tag} has {} values", e.count)));
            }
            let v: Option<Vec<u32>> = (0..e.count as usize)
                .map(|i| match e.typ {
                    1 | 7 => r.u8(e.at + i).map(u32::from),
                    3 => r.u16(e.at + 2 * i).map(u32::from),
                    4 => r.u32(e.at + 4 * i),
                    _ => None,
                })
                .collect();
            v.map(Some).ok_or_else(|| {
                corrupt(format!(
                    "TIFF tag {tag} (type {}, {} values) is unreadable",
                    e.typ, e.count
                ))
            })
        };
        let single = |tag: u16| -> Result<Option<u32>> {
            Ok(values(tag)?.and_then(|v| (v.len() == 1).then(|| v[0])))
        };
        let width = single(256)?.ok_or_else(|| corrupt("TIFF without ImageWidth"))?;
        let height = single(257)?.ok_or_else(|| corrupt("TIFF without ImageLength"))?;
        let photometric = single(262)?;
        let photometric_at = entries.get(&262).map(|e| (e.at, e.typ));
        let compression = single(259)?.unwrap_or(1);
        let samples = single(277)?.unwrap_or(1);
        let fill_order = single(266)?.unwrap_or(1);
        let mut bits = values(258)?.unwrap_or_else(|| vec![1]);
        let extra = values(338)?.unwrap_or_default();
        let mut sample_format = values(339)?.unwrap_or_else(|| vec![1]);
        if sample_format.len() > 1 && sample_format.iter().all(|&f| f == sample_format[0]) {
            sample_format.truncate(1);
        }
        // PIL's bits-per-sample normalisation
        if (samples as usize) < bits.len() {
            bits.truncate(samples as usize);
        } else if samples as usize > bits.len() && bits.len() == 1 {
            bits = vec![bits[0]; samples as usize];
        }
        let orientation = match entries.get(&274) {
            Some(_) => single(274).ok().flatten(),
            None => xmp_orientation(&entries, &r),
        }
        .and_then(|v| u8::try_from(v).ok())
        .filter(|v| (2..=8).contains(v))
        .and_then(Orientation::from_exif);

        let layout = format!(
            "photometric {}, {} bits, extra samples {extra:?}, sample format {sample_format:?}",
            photometric.map_or("missing".into(), |p| p.to_string()),
            bits.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join("/"),
        );
        let kind = match (
            photometric,
            &sample_format[..],
            fill_order,
            &bits[..],
            &extra[..],
        ) {
            (Some(0 | 1), [1], 1, [1] | [8], []) => Ok(TiffKind::Grey8),
            (Some(1), [1], 1, [8, 8], [0] | [2]) => Ok(TiffKind::Grey8),
            (Some(1), [1], 1, [16], []) => Ok(TiffKind::Grey16),
            (Some(2), [1], 1, [8, 8, 8], []) => Ok(TiffKind::Rgb8),
            (Some(2), [1], 1, [8, 8, 8, 8], [] | [0] | [2] | [999]) => Ok(TiffKind::Rgb8),
            (Some(2), [1], 1, [8, 8, 8, 8], [1]) => Ok(TiffKind::Rgb8Premultiplied),
            (Some(2), [1], 1, [16, 16, 16], []) => Ok(TiffKind::Rgb16),
            (Some(2), [1], 1, [16, 16, 16, 16], [] | [0] | [2]) => Ok(TiffKind::Rgb16),
            (Some(3), [1], 1, [1] | [8], []) => Ok(TiffKind::Palette),
            (Some(5), [1], 1, [8, 8, 8, 8], []) => Ok(TiffKind::Cmyk8),
            _ => Err(format!("TIFF with {layout}, fill order {fill_order}")),
        };
        let bilevel = bits == [1];
        let kind = kind.and_then(|k| {
            let group4 = compression == 4 && bilevel && k != TiffKind::Palette;
            if TIFF_COMPRESSIONS.contains(&compression) || group4 {
                Ok(k)
            } else {
                Err(format!("TIFF compression {compression}"))
            }
        });
        let palette_bits = bits.first().map_or(1, |&b| b.min(16) as u16);
        let colormap = if kind == Ok(TiffKind::Palette) {
            values(320)?
                .filter(|m| m.len() == 3usize << palette_bits)
                .ok_or_else(|| corrupt("palette TIFF without a ColorMap of 3 x 2^bits entries"))?
                .into_iter()
                .map(|v| v as u16)
                .collect()
        } else {
            Vec::new()
        };
        Ok(TiffHeader {
            big_endian: r.big_endian,
            width,
            height,
            kind,
            photometric_at,
            colormap,
            palette_bits,
            orientation,
        })
    }

    fn decoded_size(&self) -> (u32, u32) {
        match self.orientation {
            Some(
                Orientation::Rotate90
                | Orientation::Rotate270
                | Orientation::Rotate90FlipH
                | Orientation::Rotate270FlipH,
            ) => (self.height, self.width),
            _ => (self.width, self.height),
        }
    }

    fn decode(&self, b: &[u8]) -> Result<RgbImage> {
        let kind = self.kind.clone().map_err(unsupported)?;
        let patch = match kind {
            TiffKind::Palette => Some(1), // BlackIsZero: the crate then yields the indices
            TiffKind::Cmyk8 => Some(2),   // RGB with 4 samples: the crate yields C, M, Y, K as RGBA
            _ => None,
        };
        let bytes = match (patch, self.photometric_at) {
            (Some(value), Some((at, typ))) => {
                let mut v = b.to_vec();
                let field: Vec<u8> = match (typ, self.big_endian) {
                    (3, false) => u16::to_le_bytes(value).to_vec(),
                    (3, true) => u16::to_be_bytes(value).to_vec(),
                    (4, false) => u32::to_le_bytes(u32::from(value)).to_vec(),
                    (4, true) => u32::to_be_bytes(u32::from(value)).to_vec(),
                    _ => return Err(corrupt("TIFF PhotometricInterpretation is not a number")),
                };
                v[at..at + field.len()].copy_from_slice(&field);
                Cow::Owned(v)
            }
            _ => Cow::Borrowed(b),
        };
        let decoded = crate_decode(&bytes, ImageFormat::Tiff, u64::MAX)?;
        if decoded.dimensions() != (self.width, self.height) {
            return Err(corrupt(format!(
                "TIFF decoded as {:?}, its header says {}x{}",
                decoded.dimensions(),
                self.width,
                self.height
            )));
        }
        let (w, h) = decoded.dimensions();
        let unexpected =
            |d: &DynamicImage| corrupt(format!("TIFF decoded as {:?} for {kind:?}", d.color()));
        let pixels: Vec<u8> = match (kind, decoded) {
            (TiffKind::Grey8, DynamicImage::ImageLuma8(l)) => {
                l.iter().flat_map(|&v| [v, v, v]).collect()
            }
            (TiffKind::Grey8, DynamicImage::ImageLumaA8(la)) => {
                la.pixels().flat_map(|p| [p[0]; 3]).collect()
            }
            (TiffKind::Grey16, DynamicImage::ImageLuma16(l)) => l
                .iter()
                .flat_map(|&v| [u8::try_from(v).unwrap_or(u8::MAX); 3])
                .collect(),
            (TiffKind::Rgb8, DynamicImage::ImageRgb8(rgb)) => rgb.into_raw(),
            (TiffKind::Rgb8, DynamicImage::ImageRgba8(rgba)) => {
                rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect()
            }
            (TiffKind::Rgb8Premultiplied, DynamicImage::ImageRgba8(rgba)) => {
                rgba.pixels().flat_map(|p| unpremultiply(p.0)).collect()
            }
            (TiffKind::Rgb16, DynamicImage::ImageRgb16(rgb)) => {
                rgb.iter().map(|&v| (v >> 8) as u8).collect()
            }
            (TiffKind::Rgb16, DynamicImage::ImageRgba16(rgba)) => rgba
                .pixels()
                .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
                .collect(),
            (TiffKind::Palette, DynamicImage::ImageLuma8(l)) => {
                // the ColorMap as PIL's "RGB;L" palette: high bytes, planar
                let n = 1usize << self.palette_bits;
                let lut: Vec<[u8; 3]> = (0..n)
                    .map(|i| [0, 1, 2].map(|c| (self.colormap[c * n + i] >> 8) as u8))
                    .collect();
                // a 1-bit image comes back as 0/255
                let index = |v: u8| {
                    if n == 2 {
                        usize::from(v != 0)
                    } else {
                        usize::from(v)
                    }
                };
                l.iter().flat_map(|&v| lut[index(v)]).collect()
            }
            (TiffKind::Cmyk8, DynamicImage::ImageRgba8(cmyk)) => {
                cmyk.pixels().flat_map(|p| cmyk2rgb(p.0)).collect()
            }
            (_, other) => return Err(unexpected(&other)),
        };
        let rgb = RgbImage::from_raw(w, h, pixels).expect("buffer sized from the image");
        Ok(match self.orientation {
            Some(o) => {
                let mut img = DynamicImage::ImageRgb8(rgb);
                img.apply_orientation(o);
                img.into_rgb8()
            }
            None => rgb,
        })
    }
}

/// The orientation in an XMP packet (tag 700), which PIL's `getexif` falls back to without an Orientation tag:
/// the first `tiff:Orientation="N` or `tiff:Orientation>N`.
fn xmp_orientation(
    entries: &std::collections::BTreeMap<u16, IfdEntry>,
    r: &Bytes<'_>,
) -> Option<u32> {
    let e = entries.get(&700).filter(|e| matches!(e.typ, 1 | 7))?;
    xmp_orientation_in(r.slice(e.at, e.count as usize)?)
}

/// PIL's `re.search(rb'tiff:Orientation(="|>)([0-9])', xmp)`.
fn xmp_orientation_in(xmp: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"tiff:Orientation";
    (0..xmp.len())
        .filter(|&i| xmp[i..].starts_with(KEY))
        .find_map(|i| match &xmp[i + KEY.len()..] {
            [b'>', d, ..] | [b'=', b'"', d, ..] if d.is_ascii_digit() => Some(u32::from(d - b'0')),
            _ => None,
        })
}

/// PIL's `unpackRGBa`: premultiplied RGBA to RGB (`v * 255 / a`, truncated and clipped; black where a = 0).
fn unpremultiply([r, g, b, a]: [u8; 4]) -> [u8; 3] {
    match a {
        0 => [0; 3],
        255 => [r, g, b],
        a => [r, g, b].map(|v| (u32::from(v) * 255 / u32::from(a)).min(255) as u8),
    }
}

/// PIL's `cmyk2rgb` (Convert.c): `nk - c * nk / 255` with `nk = 255 - k`, in its MULDIV255 rounding.
fn cmyk2rgb([c, m, y, k]: [u8; 4]) -> [u8; 3] {
    let nk = 255 - i32::from(k);
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(i32::from(v), nk)).clamp(0, 255) as u8)
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

    #[test]
    fn bmp_16_bit_fields_widen_as_pil() {
        for max in [31u32, 63] {
            let table = pil_widening(max);
            for v in 0..=max {
                // the image crate's widening (its lookup tables): to nearest
                let crate_value = (f64::from(v * 255) / f64::from(max)).round() as usize;
                assert_eq!(u32::from(table[crate_value]), v * 255 / max, "{v}/{max}");
            }
        }
        assert_eq!(pil_widening(31)[247], 246); // 30: the crate gives 247, PIL 246
    }

    #[test]
    fn cmyk_and_premultiplied_alpha_as_pil() {
        assert_eq!(cmyk2rgb([0, 0, 0, 0]), [255, 255, 255]);
        assert_eq!(cmyk2rgb([255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(cmyk2rgb([0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(cmyk2rgb([128, 64, 0, 100]), [77, 116, 155]);
        assert_eq!(unpremultiply([10, 20, 30, 0]), [0, 0, 0]);
        assert_eq!(unpremultiply([10, 20, 30, 255]), [10, 20, 30]);
        assert_eq!(unpremultiply([50, 100, 128, 128]), [99, 199, 255]);
    }

    #[test]
    fn gif_identity_palette_is_grey() {
        let identity: Vec<u8> = (0..16u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(gif_palette(&identity), None);
        let mut other = identity.clone();
        other[4] = 9;
        assert_eq!(gif_palette(&other), Some(other.clone()));
    }

    #[test]
    fn xmp_orientation_follows_pillows_pattern() {
        assert_eq!(xmp_orientation_in(br#"<x tiff:Orientation="6"/>"#), Some(6));
        assert_eq!(
            xmp_orientation_in(b"<tiff:Orientation>3</tiff:Orientation>"),
            Some(3)
        );
        assert_eq!(xmp_orientation_in(br#"tiff:Orientation = "6""#), None);
        assert_eq!(
            xmp_orientation_in(br#"tiff:Orientation="x" tiff:Orientation="8""#),
            Some(8)
        );
        assert_eq!(xmp_orientation_in(b"tiff:Orientation="), None);
    }
}
