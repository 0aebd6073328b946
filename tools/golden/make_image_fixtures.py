"""Image fixtures: encoded test images and the reference transform's output for them.

The reference (diffusers examples/research_projects/sana/train_sana_sprint_diffusers.py) does, per row:
    Image.open(BytesIO(bytes)).convert("RGB")
    -> torchvision Resize(res) (bilinear; PIL antialiased resample) -> CenterCrop(res) -> ToTensor -> Normalize(0.5, 0.5)
This script builds small images in every mode the real PIL decoder produces (RGB, RGBA, L, LA, P with and
without transparency, a palette shorter than its indices, 1/2/4-bit grey, I;16 with and without tRNS, 16-bit
RGB/RGBA/LA, RGB 4:2:0/4:2:2/4:4:4, grey, CMYK, progressive and EXIF-rotated JPEG, lossy and lossless WebP with
and without alpha), saves their encoded bytes to tests/fixtures/images/, and runs the real PIL + torchvision
transform on them. Resolutions cover downscales, upscales (12x10 and 20x90 at 32, 17x17 at 40), the identity
size, and centre crops whose offset is x.5 (Python's round-half-even).

Outputs (all under tests/fixtures/):
    images/NAME.EXT            encoded bytes
    images_ref.safetensors     NAME.rgb   uint8 [H, W, 3]   PIL's Image.open(...).convert("RGB") (small images only)
                               NAME.rRES  float32 [3, RES, RES]  the full reference transform at resolution RES
    images_ref.json            manifest: NAME -> file, PIL mode, size, resolutions

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
    return out


# resolutions besides 16/24: upscales, identity size (17), and larger downscales
EXTRA_RES = {"rgb_12x10.png": [32], "l_20x90.png": [32], "rgb_17x17.png": [17, 40], "rgb_300x200.png": [64],
             "rgb_300x200.jpg": [64], "rgb_64x48.jpg": [48]}


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
        if size[0] * size[1] <= 4096:
            tensors[name + ".rgb"] = torch.from_numpy(np.asarray(rgb).copy())
        # 24 (odd crop offsets) only where decoding is exact, to keep the fixture small
        resolutions = ([16] if file.endswith(".jpg") or "lossy" in file else [16, 24]) + EXTRA_RES.get(file, [])
        for res in resolutions:
            tensors[f"{name}.r{res}"] = reference_transform(res)(rgb).contiguous()
        manifest[name] = {"file": file, "pil_mode": mode, "size": list(size), "resolutions": resolutions,
                          "has_rgb": name + ".rgb" in tensors}
        print(f"{file:28s} {mode:5s} {size} {len(data)} bytes")
    save_file(tensors, os.path.join(FIXTURES, "images_ref.safetensors"))
    with open(os.path.join(FIXTURES, "images_ref.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(IMAGES, f)) for f in os.listdir(IMAGES))
    print("images:", total, "bytes; reference:", os.path.getsize(os.path.join(FIXTURES, "images_ref.safetensors")), "bytes")


if __name__ == "__main__":
    main()
