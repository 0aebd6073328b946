"""Image fixtures: encoded test images and the reference transform's output for them.

The reference (diffusers examples/research_projects/sana/train_sana_sprint_diffusers.py) does, per row:
    Image.open(BytesIO(bytes)).convert("RGB")
    -> torchvision Resize(res) (bilinear; PIL antialiased resample) -> CenterCrop(res) -> ToTensor -> Normalize(0.5, 0.5)
This script builds small images in every mode the real PIL decoder produces (RGB, RGBA, L, LA, P with and
without transparency, a palette shorter than its indices, 1/2/4-bit grey, I;16 with and without tRNS, 16-bit
RGB/RGBA/LA, RGB 4:2:0/4:2:2/4:4:4, grey, CMYK, progressive and EXIF-rotated JPEG, lossy and lossless WebP with
and without alpha), and GIF/BMP/TIFF in the sub-formats sprint-prep reads (GIF first frames with palettes,
transparency, offset/oversized frames, L mode; BMP 1/4/8-bit palettes, 16/24/32-bit, bit fields, top-down, OS/2;
TIFF raw/LZW/deflate/PackBits/Group 4, predictor, planar, tiles, grey, 16-bit, RGBA associated or not, palette,
CMYK, orientation), saves their encoded bytes to tests/fixtures/images/, and runs the real PIL + torchvision
transform on them. Resolutions cover downscales, upscales (12x10 and 20x90 at 32, 17x17 at 40), the identity
size, and centre crops whose offset is x.5 (Python's round-half-even). A few more files (REFUSED) are
sub-formats PIL decodes but sprint-prep refuses; they have no reference tensors.

Outputs (all under tests/fixtures/):
    images/NAME.EXT            encoded bytes
    images_ref.safetensors     NAME.rgb   uint8 [H, W, 3]   PIL's Image.open(...).convert("RGB") (small images only)
                               NAME.rRES  float32 [3, RES, RES]  the full reference transform at resolution RES
    images_ref.json            manifest: NAME -> file, PIL mode, size, resolutions (and why it is refused)

Pinned versions used to generate the checked-in fixtures: Pillow 13.0.0 (libjpeg-turbo 3.2.0, libwebp 1.6.0),
torchvision 0.29.2, torch 2.15.0, numpy 2.4.6, safetensors 0.8.0.

Run from the repository root:
    /work/venv/bin/python tools/golden/make_image_fixtures.py
"""
import io
import json
import os
import struct
import zlib

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
IMAGES = os.path.join(FIXTURES, "images")


def reference_transform(res):
    # exactly the reference script's train_transforms (interpolation defaults to BILINEAR)
    return transforms.Compose(
        [
            transforms.Resize(res),
            transforms.CenterCrop(res),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def pattern(w, h, seed, noise=12.0):
    """Synthetic RGB content with gradients, edges, a disc and noise (uint8 [h, w, 3])."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(x * 0.7 + y * 0.3 + seed)
    img = np.stack([r, g, b], -1)
    cx, cy, rad = w * 0.6, h * 0.4, min(w, h) * 0.3
    disc = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
    img[disc] = [250, 30, 90]
    img[(x.astype(int) // 5) % 4 == 0] *= 0.5  # hard vertical stripes
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def png_chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def raw_png(width, height, color_type, bit_depth, rows, plte=None, trns=None):
    """A PNG written by hand, for bit depths/color types PIL cannot save; rows: list of packed row bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = b"".join(b"\x00" + r for r in rows)  # filter type 0 (None) on every row
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if plte is not None:
        out += png_chunk(b"PLTE", plte)
    if trns is not None:
        out += png_chunk(b"tRNS", trns)
    return out + png_chunk(b"IDAT", zlib.compress(data, 9)) + png_chunk(b"IEND", b"")


def pack_bits(values, bits):
    """Pack a row of small integers MSB first (PNG sub-byte sample packing)."""
    per_byte = 8 // bits
    out = bytearray()
    for i in range(0, len(values), per_byte):
        byte = 0
        for j, v in enumerate(values[i : i + per_byte]):
            byte |= int(v) << (8 - bits * (j + 1))
        out.append(byte)
    return bytes(out)


def save_pil(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def build_images():
    """name -> encoded bytes."""
    out = {}
    rgb = pattern(37, 23, 1)
    out["rgb_37x23.png"] = save_pil(Image.fromarray(rgb), "PNG")
    out["rgb_300x200.png"] = save_pil(Image.fromarray(pattern(300, 200, 2, noise=2.0)), "PNG")
    out["rgb_12x10.png"] = save_pil(Image.fromarray(pattern(12, 10, 3)), "PNG")
    out["rgb_17x17.png"] = save_pil(Image.fromarray(pattern(17, 17, 13)), "PNG")

    rgba = np.concatenate([pattern(64, 48, 4), (np.arange(64 * 48).reshape(48, 64, 1) * 7 % 256).astype(np.uint8)], -1)
    out["rgba_64x48.png"] = save_pil(Image.fromarray(rgba, "RGBA"), "PNG")
    out["l_20x90.png"] = save_pil(Image.fromarray(pattern(20, 90, 5)[..., 1]), "PNG")
    la = np.stack([pattern(45, 31, 6)[..., 0], (np.arange(45 * 31).reshape(31, 45) * 3 % 256).astype(np.uint8)], -1)
    out["la_45x31.png"] = save_pil(Image.fromarray(la, "LA"), "PNG")

    pimg = Image.fromarray(pattern(50, 40, 7)).quantize(colors=200, dither=Image.Dither.NONE)
    out["p_50x40.png"] = save_pil(pimg, "PNG")
    ptr = Image.fromarray(pattern(33, 47, 8)).quantize(colors=16, dither=Image.Dither.NONE)
    out["p_trns_33x47.png"] = save_pil(ptr, "PNG", transparency=bytes([0, 128] + [255] * 14))

    # 16-bit grey: PIL opens it as I;16 and convert("RGB") clips each sample to 255 (values < 256 survive)
    g16 = (pattern(40, 30, 9)[..., 0].astype(np.uint16) * 3).astype(">u2")
    g16[:, :10] = np.arange(10, dtype=np.uint16) * 25 + 1000  # > 255 -> 255
    out["i16_40x30.png"] = raw_png(40, 30, 0, 16, [r.tobytes() for r in g16])
    rgb16 = (pattern(36, 28, 10).astype(np.uint16) * 257 + np.arange(36 * 28 * 3).reshape(28, 36, 3) % 257).astype(">u2")
    out["rgb16_36x28.png"] = raw_png(36, 28, 2, 16, [r.tobytes() for r in rgb16])
    rgba16 = np.concatenate([rgb16, np.full((28, 36, 1), 40000, ">u2")], -1)
    out["rgba16_36x28.png"] = raw_png(36, 28, 6, 16, [r.tobytes() for r in rgba16])
    la16 = np.stack([rgb16[..., 0], rgb16[..., 1]], -1).astype(">u2")
    out["la16_36x28.png"] = raw_png(36, 28, 4, 16, [r.tobytes() for r in la16])
    g2 = pattern(30, 20, 11)[..., 0] >> 6
    out["gray2_30x20.png"] = raw_png(30, 20, 0, 2, [pack_bits(r, 2) for r in g2])
    g1 = pattern(29, 21, 12)[..., 1] >> 7
    out["gray1_29x21.png"] = raw_png(29, 21, 0, 1, [pack_bits(r, 1) for r in g1])
    p4 = pattern(27, 19, 14)[..., 2] >> 4
    palette = bytes(v for i in range(16) for v in (i * 16, 255 - i * 16, (i * 77) % 256))
    out["p4_27x19.png"] = raw_png(27, 19, 3, 4, [pack_bits(r, 4) for r in p4], plte=palette)
    # tRNS on 16-bit grey: the Rust decoder adds alpha, PIL still opens I;16 (clip rule, not high byte)
    out["i16_trns_22x14.png"] = raw_png(22, 14, 0, 16, [r.tobytes() for r in g16[:14, 8:30]], trns=b"\x03\xe8")
    # palette shorter than the indices used: PIL maps the missing entries to black
    p_idx = (pattern(23, 15, 27)[..., 0] >> 5).astype(np.uint8)  # indices 0..7
    out["p_short_23x15.png"] = raw_png(23, 15, 3, 8, [r.tobytes() for r in p_idx], plte=bytes(range(10, 22)))
    # tRNS on a truecolor image: PIL keeps mode RGB (transparency in info only), convert("RGB") ignores it
    rgbt = pattern(26, 18, 15)
    out["rgb_trns_26x18.png"] = raw_png(26, 18, 2, 8, [r.tobytes() for r in rgbt], trns=bytes([0, 10, 0, 20, 0, 30]))

    out["rgb_64x48.jpg"] = save_pil(Image.fromarray(pattern(64, 48, 16)), "JPEG", quality=90)
    out["rgb444_61x45.jpg"] = save_pil(Image.fromarray(pattern(61, 45, 17)), "JPEG", quality=95, subsampling=0)
    out["rgb422_50x30.jpg"] = save_pil(Image.fromarray(pattern(50, 30, 18)), "JPEG", quality=85, subsampling=1)
    out["rgb_prog_70x52.jpg"] = save_pil(Image.fromarray(pattern(70, 52, 19)), "JPEG", quality=90, progressive=True)
    # EXIF orientation 6 (rotate 90): PIL's Image.open does not apply it, nor must we
    exif = Image.Exif()
    exif[0x0112] = 6
    out["rgb_exif6_40x24.jpg"] = save_pil(Image.fromarray(pattern(40, 24, 28)), "JPEG", quality=90, exif=exif)
    out["rgb_300x200.jpg"] = save_pil(Image.fromarray(pattern(300, 200, 20)), "JPEG", quality=90)
    out["l_41x29.jpg"] = save_pil(Image.fromarray(pattern(41, 29, 21)[..., 0]), "JPEG", quality=90)
    cmyk = Image.fromarray(np.concatenate([pattern(48, 36, 22), pattern(48, 36, 23)[..., :1]], -1), "CMYK")
    out["cmyk_48x36.jpg"] = save_pil(cmyk, "JPEG", quality=95)

    out["rgb_lossy_60x44.webp"] = save_pil(Image.fromarray(pattern(60, 44, 24)), "WEBP", quality=80)
    out["rgb_lossless_39x27.webp"] = save_pil(Image.fromarray(pattern(39, 27, 25)), "WEBP", lossless=True)
    rgbaw = np.concatenate([pattern(42, 34, 26), (np.arange(42 * 34).reshape(34, 42, 1) * 5 % 256).astype(np.uint8)], -1)
    out["rgba_lossy_42x34.webp"] = save_pil(Image.fromarray(rgbaw, "RGBA"), "WEBP", quality=80)
    out["rgba_lossless_42x34.webp"] = save_pil(Image.fromarray(rgbaw, "RGBA"), "WEBP", lossless=True, exact=True)
    # EXIF orientation 8 in a PNG eXIf chunk: PIL's PNG plugin does not apply it either
    exif8 = Image.Exif()
    exif8[0x0112] = 8
    out["rgb_exif8_20x12.png"] = save_pil(Image.fromarray(pattern(20, 12, 97)), "PNG", exif=exif8)
    out.update(build_gif_images())
    out.update(build_bmp_images())
    out.update(build_tiff_images())
    return out



# ---------------------------------------------------------------------------------------------------------------
# GIF, BMP and TIFF: PIL-written files where PIL can write the sub-format, hand-written ones for the rest.


def gif_descriptor(data):
    """Offset of the first image descriptor (b",") of a GIF, walking the blocks as PIL does."""
    flags = data[10]
    i = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    while data[i] != 0x2C:
        assert data[i] == 0x21, hex(data[i])
        i += 2
        while data[i]:
            i += data[i] + 1
        i += 1
    return i


def quantized(w, h, seed, colors):
    return Image.fromarray(pattern(w, h, seed)).quantize(colors=colors, dither=Image.Dither.NONE)


def build_gif_images():
    out = {}
    # 8-bit palette, interlaced (PIL interlaces by default when both sides are >= 16) and not
    out["gif_p_21x16.gif"] = save_pil(quantized(21, 16, 40, 120), "GIF")
    out["gif_p_noninterlaced_17x12.gif"] = save_pil(quantized(17, 12, 41, 60), "GIF", interlace=False)
    # a transparent index: convert("RGB") gives its palette colour (transparency is ignored)
    trns = quantized(18, 13, 42, 16)
    out["gif_trns_18x13.gif"] = save_pil(trns, "GIF", transparency=int(np.asarray(trns)[0, 0]))
    # animation whose later frames differ (other content, other palettes): only the first frame counts
    frames = [quantized(16, 12, 43 + k, 32) for k in range(3)]
    out["gif_anim_16x12.gif"] = save_pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50,
                                         loop=0)
    # grey: an identity palette (optimize=False keeps all 256 entries), which PIL opens as mode L
    out["gif_l_16x12.gif"] = save_pil(Image.fromarray(pattern(16, 12, 46)[..., 1]), "GIF", optimize=False)
    # a 4-entry palette with indices up to 6: PIL maps the missing entries to black
    idx = Image.fromarray((pattern(14, 10, 47)[..., 0] % 7).astype(np.uint8), "P")
    idx.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200, 90, 90, 90])
    out["gif_short_palette_14x10.gif"] = save_pil(idx, "GIF")
    # the first frame smaller than the logical screen, at an offset, with a transparent index: PIL fills the
    # screen outside the frame with the transparent index; and the same without transparency (index 0)
    for name, kw in [("gif_offset_trns_20x16.gif", {"transparency": 5}), ("gif_offset_20x16.gif", {})]:
        d = bytearray(save_pil(quantized(12, 9, 48, 16), "GIF", **kw))
        i = gif_descriptor(d)
        d[6:10] = struct.pack("<HH", 20, 16)
        d[i + 1 : i + 5] = struct.pack("<HH", 5, 4)
        out[name] = bytes(d)
    # the first frame larger than the logical screen (10x8): PIL grows the image to hold it
    d = bytearray(save_pil(quantized(12, 9, 49, 16), "GIF"))
    i = gif_descriptor(d)
    d[6:10] = struct.pack("<HH", 10, 8)
    d[i + 1 : i + 5] = struct.pack("<HH", 3, 2)
    out["gif_exceeds_screen_15x11.gif"] = bytes(d)
    # the palette moved from the global table to a local one on the frame
    d = save_pil(quantized(13, 9, 50, 8), "GIF")
    bits = (d[10] & 7) + 1
    pal = d[13 : 13 + (3 << bits)]
    rest = bytearray(d[13 + (3 << bits) :])
    i = gif_descriptor(d) - len(pal)
    rest[i - 13 + 9] |= 0x80 | (bits - 1)
    split = i - 13 + 10  # just after the image descriptor
    out["gif_local_palette_13x9.gif"] = d[:10] + bytes([d[10] & 0x70, 0, 0]) + rest[:split] + pal + rest[split:]
    # no colour table at all: PIL opens mode L, the indices are the grey levels
    d = save_pil(quantized(11, 8, 51, 8), "GIF")
    bits = (d[10] & 7) + 1
    out["gif_no_palette_11x8.gif"] = d[:10] + bytes([d[10] & 0x70]) + d[11:13] + d[13 + (3 << bits) :]
    return out


def raw_bmp(width, height, bits, rows, palette=b"", compression=0, header=40, masks=None, pixel_data=None):
    """A BMP written by hand; rows: top-to-bottom packed rows (padded here), stored bottom-up unless height < 0.
    pixel_data replaces the rows (RLE streams)."""
    if pixel_data is None:
        stride = (width * bits + 31) // 32 * 4
        ordered = rows if height < 0 else rows[::-1]
        pixel_data = b"".join(r + b"\x00" * (stride - len(r)) for r in ordered)
    if header == 12:
        dib = struct.pack("<IHHHH", 12, width, height, 1, bits)
    else:
        colors = len(palette) // 4
        dib = struct.pack("<IiiHHIIiiII", header, width, height, 1, bits, compression, len(pixel_data), 2835, 2835,
                          colors, 0)
        if header > 40:
            dib += struct.pack("<IIII", *masks) + b"\x00" * (header - 56)
        elif masks is not None:
            dib += struct.pack("<III", *masks[:3])  # BI_BITFIELDS after a 40-byte header
    offset = 14 + len(dib) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixel_data), 0, 0, offset) + dib + palette + pixel_data


def bmp_palette(n, seed):
    rng = np.random.default_rng(seed)
    return bytes(np.concatenate([rng.integers(0, 256, (n, 3)), np.zeros((n, 1), int)], 1).astype(np.uint8).ravel())


def rle8(rows):
    """RLE8 stream (rows top-to-bottom, stored bottom-up): runs, an absolute run, a delta and end of line."""
    out = bytearray()
    for y, r in enumerate(rows[::-1]):
        r = bytes(r)
        if y == 3:  # delta: skip 5 pixels right and 1 row up, leaving them at index 0
            out += b"\x00\x02\x05\x01"
            continue
        if y == 4:
            r = r[5:]
        out += b"\x00" + bytes([6]) + r[:6]  # absolute run (even length, no padding)
        i = 6
        while i < len(r):
            n = 1
            while i + n < len(r) and r[i + n] == r[i] and n < 255:
                n += 1
            out += bytes([n, r[i]])
            i += n
        out += b"\x00\x00"
    return bytes(out + b"\x00\x01")


def build_bmp_images():
    out = {}
    # odd widths: rows padded to 4 bytes
    out["bmp_rgb24_19x13.bmp"] = save_pil(Image.fromarray(pattern(19, 13, 60)), "BMP")
    # PIL writes RGBA as 32-bit BI_RGB and reads the fourth byte back as padding (mode RGB)
    rgba = np.concatenate([pattern(18, 12, 61), (np.arange(216).reshape(12, 18, 1) * 7 % 256).astype(np.uint8)], -1)
    out["bmp_rgba32_18x12.bmp"] = save_pil(Image.fromarray(rgba, "RGBA"), "BMP")
    # 32-bit BITFIELDS with an alpha mask in a V4 header: PIL mode RGBA (convert drops the alpha)
    b32 = rgba[..., [2, 1, 0, 3]]
    out["bmp_bitfields32_18x12.bmp"] = raw_bmp(18, 12, 32, [r.tobytes() for r in b32], compression=3, header=108,
                                               masks=(0xFF0000, 0xFF00, 0xFF, 0xFF000000))
    out["bmp_p8_21x14.bmp"] = save_pil(quantized(21, 14, 62, 100), "BMP")
    out["bmp_l8_15x11.bmp"] = save_pil(Image.fromarray(pattern(15, 11, 63)[..., 2]), "BMP")
    out["bmp_1bit_21x13.bmp"] = save_pil(Image.fromarray(pattern(21, 13, 64)[..., 1] > 127), "BMP")
    # 1-bit and 4-bit with coloured palettes (PIL mode P), a palette shorter than the indices used (missing
    # entries are black in PIL), 16-bit 5-5-5 and 5-6-5 (PIL widens v to v * 255 // max), top-down rows, an
    # OS/2 core header, and RLE8 (refused)
    bits1 = pattern(19, 13, 65)[..., 0] >> 7
    out["bmp_p1_19x13.bmp"] = raw_bmp(19, 13, 1, [pack_bits(r, 1) for r in bits1], palette=bmp_palette(2, 65))
    nib = pattern(17, 12, 66)[..., 2] >> 4
    out["bmp_p4_17x12.bmp"] = raw_bmp(17, 12, 4, [pack_bits(r, 4) for r in nib], palette=bmp_palette(16, 66))
    out["bmp_p4_short_palette_17x12.bmp"] = raw_bmp(17, 12, 4, [pack_bits(r, 4) for r in nib],
                                                    palette=bmp_palette(9, 67))
    px = pattern(17, 12, 68).astype(np.uint16)
    p555 = ((px[..., 0] >> 3) << 10) | ((px[..., 1] >> 3) << 5) | (px[..., 2] >> 3)
    out["bmp_rgb555_17x12.bmp"] = raw_bmp(17, 12, 16, [r.astype("<u2").tobytes() for r in p555])
    p565 = ((px[..., 0] >> 3) << 11) | ((px[..., 1] >> 2) << 5) | (px[..., 2] >> 3)
    out["bmp_rgb565_17x12.bmp"] = raw_bmp(17, 12, 16, [r.astype("<u2").tobytes() for r in p565], compression=3,
                                          masks=(0xF800, 0x7E0, 0x1F, 0))
    td = pattern(15, 10, 69)[..., ::-1]
    out["bmp_topdown_15x10.bmp"] = raw_bmp(15, -10, 24, [r.tobytes() for r in td])
    core = quantized(15, 10, 70, 40)
    cpal = np.asarray(core.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)[:, ::-1].ravel().tobytes()
    cpal += b"\x00" * (768 - len(cpal))
    out["bmp_os2_p8_15x10.bmp"] = raw_bmp(15, 10, 8, [r.tobytes() for r in np.asarray(core)], palette=cpal, header=12)
    runs = (pattern(16, 12, 71)[..., 0] >> 5).astype(np.uint8)
    runs[:, 8:14] = 3
    out["bmp_rle8_16x12.bmp"] = raw_bmp(16, 12, 8, None, palette=bmp_palette(8, 71), compression=1,
                                        pixel_data=rle8(runs))
    return out


def raw_tiff(width, height, data, tags, big_endian=False, tile=None):
    """A TIFF written by hand. data: the bytes of one strip, or a list of strips (or of tiles when tile =
    (tile_width, tile_length)). tags: {tag: (type, [values])} besides the strip/tile layout ones."""
    e = ">" if big_endian else "<"
    chunks = data if isinstance(data, list) else [data]
    tags = dict(tags)
    tags.update({256: (3, [width]), 257: (3, [height])})
    offsets_tag, counts_tag = (324, 325) if tile else (273, 279)
    if tile:
        tags.update({322: (3, [tile[0]]), 323: (3, [tile[1]])})
    elif len(chunks) == 1:
        tags[278] = (3, [height])
    tags[offsets_tag] = (4, [0] * len(chunks))
    tags[counts_tag] = (4, [len(c) for c in chunks])
    entries = sorted(tags.items())
    ifd_size = 2 + 12 * len(entries) + 4
    size = {3: 2, 4: 4}
    extra, extra_at = b"", 8 + ifd_size
    pixel_at = extra_at + sum(len(v) * size[t] for _, (t, v) in entries if len(v) * size[t] > 4)
    starts = [pixel_at + sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    fmt = {3: "H", 4: "I"}
    ifd = struct.pack(e + "H", len(entries))
    for tag, (typ, values) in entries:
        if tag == offsets_tag:
            values = starts
        raw = struct.pack(e + fmt[typ] * len(values), *values)
        if len(raw) <= 4:
            ifd += struct.pack(e + "HHI", tag, typ, len(values)) + raw + b"\x00" * (4 - len(raw))
        else:
            ifd += struct.pack(e + "HHII", tag, typ, len(values), extra_at + len(extra))
            extra += raw
    ifd += struct.pack(e + "I", 0)
    head = (b"MM\x00\x2a" if big_endian else b"II\x2a\x00") + struct.pack(e + "I", 8)
    return head + ifd + extra + b"".join(chunks)


def horizontal_difference(img):
    """TIFF predictor 2 on uint8 [h, w, c] samples."""
    d = img.astype(np.int16)
    d[:, 1:] -= img[:, :-1].astype(np.int16)
    return (d % 256).astype(np.uint8)


def build_tiff_images():
    out = {}
    out["tiff_rgb_raw_19x13.tif"] = save_pil(Image.fromarray(pattern(19, 13, 80)), "TIFF")
    out["tiff_rgb_lzw_18x13.tif"] = save_pil(Image.fromarray(pattern(18, 13, 81)), "TIFF", compression="tiff_lzw")
    out["tiff_rgb_deflate_17x12.tif"] = save_pil(Image.fromarray(pattern(17, 12, 82)), "TIFF",
                                                 compression="tiff_adobe_deflate")
    out["tiff_rgb_packbits_17x12.tif"] = save_pil(Image.fromarray(pattern(17, 12, 83)), "TIFF", compression="packbits")
    out["tiff_l_lzw_17x12.tif"] = save_pil(Image.fromarray(pattern(17, 12, 84)[..., 0]), "TIFF", compression="tiff_lzw")
    rgba = np.concatenate([pattern(16, 12, 85), (np.arange(192).reshape(12, 16, 1) * 9 % 256).astype(np.uint8)], -1)
    out["tiff_rgba_16x12.tif"] = save_pil(Image.fromarray(rgba, "RGBA"), "TIFF", compression="tiff_adobe_deflate")
    out["tiff_1bit_g4_24x16.tif"] = save_pil(Image.fromarray(pattern(24, 16, 86)[..., 1] > 127), "TIFF",
                                             compression="group4")
    # 16-bit grey: PIL mode I;16 (little endian) or I;16B, convert("RGB") clips at 255
    g16 = pattern(16, 12, 87)[..., 0].astype(np.uint16) * 3
    g16[:, :6] = np.arange(6, dtype=np.uint16) * 999 + 256
    out["tiff_i16_16x12.tif"] = raw_tiff(16, 12, g16.astype("<u2").tobytes(),
                                         {258: (3, [16]), 259: (3, [1]), 262: (3, [1]), 277: (3, [1])})
    out["tiff_i16be_16x12.tif"] = raw_tiff(16, 12, g16.astype(">u2").tobytes(),
                                           {258: (3, [16]), 259: (3, [1]), 262: (3, [1]), 277: (3, [1])},
                                           big_endian=True)
    # 16-bit RGB: the high byte
    rgb16 = (pattern(15, 10, 88).astype(np.uint16) * 257 + np.arange(15 * 10 * 3).reshape(10, 15, 3) % 251)
    out["tiff_rgb16_15x10.tif"] = raw_tiff(15, 10, rgb16.astype("<u2").tobytes(),
                                           {258: (3, [16] * 3), 259: (3, [1]), 262: (3, [2]), 277: (3, [3])})
    # associated (premultiplied) alpha, 0 to 255: PIL's RGBa unpacking divides it out
    a = (np.arange(16 * 12).reshape(12, 16, 1) * 11 % 256).astype(np.uint16)
    premul = (pattern(16, 12, 89).astype(np.uint16) * a // 255).astype(np.uint8)
    assoc = np.concatenate([premul, a.astype(np.uint8)], -1)
    out["tiff_rgba_assoc_16x12.tif"] = raw_tiff(16, 12, assoc.tobytes(), {
        258: (3, [8] * 4), 259: (3, [1]), 262: (3, [2]), 277: (3, [4]), 338: (3, [1])})
    # deflate with horizontal differencing (predictor 2), big endian
    pred = pattern(16, 11, 90)
    out["tiff_rgb_predictor_16x11.tif"] = raw_tiff(16, 11, zlib.compress(horizontal_difference(pred).tobytes(), 9), {
        258: (3, [8] * 3), 259: (3, [8]), 262: (3, [2]), 277: (3, [3]), 317: (3, [2])}, big_endian=True)
    # WhiteIsZero grey: PIL inverts it
    out["tiff_l_miniswhite_15x10.tif"] = raw_tiff(15, 10, pattern(15, 10, 91)[..., 1].tobytes(),
                                                  {258: (3, [8]), 259: (3, [1]), 262: (3, [0]), 277: (3, [1])})
    # Orientation 6 (rotate 90) and 7 (transverse): unlike JPEG/PNG/WebP, Pillow 13's TIFF plugin applies it
    # when loading (ImageOps.exif_transpose in TiffImageFile.load_end), so the decoded sizes are 15x24, 9x13
    out["tiff_orientation6_24x15.tif"] = raw_tiff(24, 15, pattern(24, 15, 92).tobytes(), {
        258: (3, [8] * 3), 259: (3, [1]), 262: (3, [2]), 274: (3, [6]), 277: (3, [3])})
    out["tiff_orientation7_13x9.tif"] = raw_tiff(13, 9, pattern(13, 9, 96).tobytes(), {
        258: (3, [8] * 3), 259: (3, [1]), 262: (3, [2]), 274: (3, [7]), 277: (3, [3])})
    # palette (the ColorMap's high bytes) and CMYK (PIL's cmyk2rgb)
    out["tiff_p_17x12.tif"] = save_pil(quantized(17, 12, 93, 50), "TIFF")
    cmyk = np.concatenate([pattern(15, 10, 94), pattern(15, 10, 95)[..., :1]], -1)
    out["tiff_cmyk_15x10.tif"] = save_pil(Image.fromarray(cmyk, "CMYK"), "TIFF")
    # bilevel WhiteIsZero, CCITT Group 3 (refused), planar RGB (one strip per plane), 16x16 deflate tiles over
    # a 20x18 image
    bw = (pattern(16, 10, 98)[..., 0] > 127).astype(np.uint8)
    out["tiff_1bit_miniswhite_16x10.tif"] = raw_tiff(16, 10, b"".join(pack_bits(r, 1) for r in bw), {
        258: (3, [1]), 259: (3, [1]), 262: (3, [0]), 277: (3, [1])})
    out["tiff_1bit_g3_24x16.tif"] = save_pil(Image.fromarray(pattern(24, 16, 99)[..., 2] > 127), "TIFF",
                                             compression="group3")
    planar = pattern(15, 11, 100)
    out["tiff_rgb_planar_15x11.tif"] = raw_tiff(15, 11, [planar[..., c].tobytes() for c in range(3)], {
        258: (3, [8] * 3), 259: (3, [1]), 262: (3, [2]), 277: (3, [3]), 284: (3, [2])})
    tiled = np.zeros((32, 32, 3), np.uint8)
    tiled[:18, :20] = pattern(20, 18, 101)
    out["tiff_rgb_tiled_20x18.tif"] = raw_tiff(20, 18, [zlib.compress(tiled[y:y + 16, x:x + 16].tobytes(), 9)
                                                        for y in (0, 16) for x in (0, 16)], {
        258: (3, [8] * 3), 259: (3, [8]), 262: (3, [2]), 277: (3, [3])}, tile=(16, 16))
    # refused (see REFUSED): YCbCr, float samples, JPEG compression
    out["tiff_ycbcr_16x8.tif"] = save_pil(Image.fromarray(pattern(16, 8, 102)).convert("YCbCr"), "TIFF")
    out["tiff_float_16x8.tif"] = save_pil(Image.fromarray(pattern(16, 8, 103)[..., 0].astype(np.float32)), "TIFF")
    out["tiff_jpeg_16x8.tif"] = save_pil(Image.fromarray(pattern(16, 8, 104)), "TIFF", compression="jpeg")
    return out

# resolutions besides 16/24: upscales, identity size (17), and larger downscales
EXTRA_RES = {"rgb_12x10.png": [32], "l_20x90.png": [32], "rgb_17x17.png": [17, 40], "rgb_300x200.png": [64],
             "rgb_300x200.jpg": [64], "rgb_64x48.jpg": [48]}
# the GIF/BMP/TIFF fixtures (and the PNG eXIf one) are transformed at 8 (a few at 16) to keep the reference
# file small: their decoding is exact, and the resampler is covered by the cases above
NEW_FORMATS = (".gif", ".bmp", ".tif")
NEW_RES = {"rgb_exif8_20x12.png": [8], "gif_p_21x16.gif": [16], "tiff_orientation6_24x15.tif": [16]}
# sub-formats PIL decodes but sprint-prep refuses ("unsupported image format: ..."): no reference tensors
REFUSED = {
    "bmp_rle8_16x12.bmp": "RLE-compressed BMP",
    "tiff_ycbcr_16x8.tif": "YCbCr TIFF",
    "tiff_float_16x8.tif": "floating-point TIFF",
    "tiff_jpeg_16x8.tif": "JPEG-compressed TIFF",
    "tiff_1bit_g3_24x16.tif": "CCITT Group 3 TIFF",
}


def resolutions_for(file):
    if file in REFUSED:
        return []
    if file.endswith(NEW_FORMATS) or file in NEW_RES:
        return NEW_RES.get(file, [8])
    # 24 (odd crop offsets) only where decoding is exact, to keep the fixture small
    return ([16] if file.endswith(".jpg") or "lossy" in file else [16, 24]) + EXTRA_RES.get(file, [])


def main():
    os.makedirs(IMAGES, exist_ok=True)
    tensors, manifest = {}, {}
    for file, data in sorted(build_images().items()):
        name = file.rsplit(".", 1)[0] + "_" + file.rsplit(".", 1)[1]
        with open(os.path.join(IMAGES, file), "wb") as f:
            f.write(data)
        im = Image.open(io.BytesIO(data))
        mode, size = im.mode, im.size
        rgb = im.convert("RGB")
        if size[0] * size[1] <= 4096 and file not in REFUSED:
            tensors[name + ".rgb"] = torch.from_numpy(np.asarray(rgb).copy())
        resolutions = resolutions_for(file)
        for res in resolutions:
            tensors[f"{name}.r{res}"] = reference_transform(res)(rgb).contiguous()
        manifest[name] = {"file": file, "pil_mode": mode, "size": list(size), "resolutions": resolutions,
                          "has_rgb": name + ".rgb" in tensors}
        if file in REFUSED:
            manifest[name]["refused"] = REFUSED[file]
        print(f"{file:28s} {mode:5s} {size} {len(data)} bytes")
    save_file(tensors, os.path.join(FIXTURES, "images_ref.safetensors"))
    with open(os.path.join(FIXTURES, "images_ref.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(IMAGES, f)) for f in os.listdir(IMAGES))
    print("images:", total, "bytes; reference:", os.path.getsize(os.path.join(FIXTURES, "images_ref.safetensors")), "bytes")


if __name__ == "__main__":
    main()
