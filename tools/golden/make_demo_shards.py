"""Demo parquet shards shaped like the reference dataset, with synthetic images and English captions.

The reference script trains on `brivangl/midjourney-v6-llava` shards (data/train_00{0,1,2}.parquet) and reads,
per row, column "image" as raw encoded image bytes (`Image.open(BytesIO(row["image"]))`) and column "llava" as
the caption. The real shards' other columns could not be checked from here, so the demo holds exactly these two:
    image: binary (encoded JPEG/PNG bytes), llava: string

Outputs (run from the repository root):
    datasets/demo/train_000.parquet .. train_002.parquet   8 rows each, row groups of 4 rows; images 96-160 px of
        varied sizes/aspect ratios, mostly RGB JPEG/PNG like the real data, a few RGBA/P/L PNGs
    tests/fixtures/shards/struct_image.parquet   4 rows with "image" stored as the Hugging Face `Image` feature,
        struct{bytes: binary, path: string}; the last row has null bytes and only a path (a reader must skip
        or report it), the others carry 32-48 px PNG/JPEG bytes

Deterministic (seeded). Pinned versions: Pillow 13.0.0, numpy 2.4.6, pyarrow 26.0.1.
    /work/venv/bin/python tools/golden/make_demo_shards.py
"""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEMO = os.path.join(ROOT, "datasets", "demo")
SHARDS = os.path.join(ROOT, "tests", "fixtures", "shards")

COLOURS = {
    "red": (214, 40, 40), "orange": (247, 127, 0), "yellow": (252, 191, 73), "green": (42, 157, 80),
    "teal": (42, 157, 143), "blue": (38, 70, 200), "purple": (120, 60, 170), "pink": (240, 128, 170),
    "white": (245, 245, 240), "black": (20, 20, 25), "brown": (120, 80, 50), "grey": (128, 128, 128),
}
SHAPES = ["circle", "square", "triangle", "ring", "stripe"]
STYLES = ["minimalist flat illustration", "abstract geometric poster", "simple vector art", "clean digital painting"]


def a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def scene(rng, w, h):
    """A gradient background with 1-3 coloured shapes; returns (RGB image, caption)."""
    names = list(COLOURS)
    top_name, bottom_name = (str(n) for n in rng.choice(names, 2, replace=False))
    top, bottom = COLOURS[top_name], COLOURS[bottom_name]
    t = np.linspace(0, 1, h)[:, None, None]
    bg = (1 - t) * np.array(top) + t * np.array(bottom)
    img = Image.fromarray(np.broadcast_to(bg, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    parts = []
    for _ in range(rng.integers(1, 4)):
        colour = str(rng.choice(names))
        shape = str(rng.choice(SHAPES))
        s = int(rng.integers(min(w, h) // 6, min(w, h) // 2))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x, y, x + s, y + s], fill=fill)
        elif shape == "square":
            draw.rectangle([x, y, x + s, y + s], fill=fill)
        elif shape == "triangle":
            draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
        elif shape == "ring":
            draw.ellipse([x, y, x + s, y + s], outline=fill, width=max(2, s // 8))
        else:
            draw.rectangle([0, y, w, y + max(3, s // 5)], fill=fill)
        where = ("upper" if y + s / 2 < h / 2 else "lower") + (" left" if x + s / 2 < w / 2 else " right")
        parts.append(f"{a(colour)} {shape} in the {where}")
    noise = np.random.default_rng(int(rng.integers(1 << 30))).normal(0, 4, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))
    subject = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    caption = (f"The image is {a(str(rng.choice(STYLES)))} showing {subject} over {a(top_name)}-to-{bottom_name} gradient background. "
               f"The composition is simple and balanced, with smooth colours and crisp edges.")
    return img, caption


def encode(img, kind):
    buf = io.BytesIO()
    if kind == "jpeg":
        img.save(buf, "JPEG", quality=88)
    elif kind == "png":
        img.save(buf, "PNG", optimize=True)
    elif kind == "rgba":
        alpha = Image.linear_gradient("L").resize(img.size)
        rgba = img.convert("RGBA")
        rgba.putalpha(alpha)
        rgba.save(buf, "PNG", optimize=True)
    elif kind == "p":
        img.quantize(colors=64).save(buf, "PNG", optimize=True)
    elif kind == "l":
        img.convert("L").save(buf, "JPEG", quality=88)
    return buf.getvalue()


def rows(rng, n, kinds):
    images, captions = [], []
    for kind in kinds[:n]:
        w, h = (int(v) for v in rng.integers(96, 161, 2))
        img, caption = scene(rng, w, h)
        images.append(encode(img, kind))
        captions.append(caption)
    return images, captions


def main():
    os.makedirs(DEMO, exist_ok=True)
    os.makedirs(SHARDS, exist_ok=True)
    rng = np.random.default_rng(2025)
    schema = pa.schema([("image", pa.binary()), ("llava", pa.string())])
    kinds = [
        ["jpeg", "jpeg", "png", "jpeg", "rgba", "jpeg", "png", "jpeg"],
        ["jpeg", "p", "jpeg", "jpeg", "png", "jpeg", "l", "jpeg"],
        ["png", "jpeg", "jpeg", "rgba", "jpeg", "jpeg", "png", "jpeg"],
    ]
    for shard, shard_kinds in enumerate(kinds):
        images, captions = rows(rng, 8, shard_kinds)
        table = pa.table({"image": images, "llava": captions}, schema=schema)
        path = os.path.join(DEMO, f"train_{shard:03d}.parquet")
        pq.write_table(table, path, row_group_size=4, compression="zstd")
        print(path, os.path.getsize(path), "bytes")

    # the Hugging Face `Image` feature layout: struct{bytes, path}, with the datasets schema metadata
    images, captions = [], []
    for i, kind in enumerate(["png", "jpeg", "png"]):
        w, h = (int(v) for v in rng.integers(32, 49, 2))
        img, caption = scene(rng, w, h)
        images.append({"bytes": encode(img, kind), "path": f"img_{i}.{'jpg' if kind == 'jpeg' else 'png'}"})
        captions.append(caption)
    images.append({"bytes": None, "path": "missing.jpg"})
    captions.append("A row whose image has a path but no bytes.")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "llava": {"dtype": "string", "_type": "Value"}}
    struct_schema = pa.schema([("image", image_type), ("llava", pa.string())],
                              metadata={"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.table({"image": pa.array(images, image_type), "llava": captions}, schema=struct_schema)
    path = os.path.join(SHARDS, "struct_image.parquet")
    pq.write_table(table, path)
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
