"""Reads a sana-sprint latent store with pylance exactly as the README shows, and checks it against STORE.md.

    python tools/read_store.py STORE.lance        (needs: pip install pylance pyarrow numpy)
Exits non-zero with a message if anything in the contract does not hold.
"""
import base64
import json
import sys

import lance
from lance_s3 import storage_options  # tools/lance_s3.py
import numpy as np
import pyarrow as pa

path = sys.argv[1]


# --- the README snippet -------------------------------------------------------------------------
# (an s3:// store: pass storage_options={"aws_endpoint": ..., ...}, or set the AWS_* variables)
ds = lance.dataset(path, storage_options=storage_options(path))
cfg = json.loads(ds.schema.metadata[b"sprint.config"])
row = ds.take([0]).to_pylist()[0]
c, h, w = row["latent_shape"]
latent = np.asarray(row["latent"], dtype=np.float32).reshape(c, h, w)
emb = np.asarray(row["prompt_embeds"], dtype=np.float32).reshape(row["prompt_len"], cfg["text_hidden_size"])
x0 = latent * cfg["vae_scaling_factor"] * 0.5  # what the trainer feeds the model (× sigma_data)
neg = np.frombuffer(base64.b64decode(cfg["negative_prompt_embeds_f32le_b64"]), dtype="<f4")
neg = neg.reshape(cfg["negative_prompt_len"], cfg["text_hidden_size"])
# -------------------------------------------------------------------------------------------------


def check(cond, msg):
    if not cond:
        print("FAIL:", msg)
        sys.exit(1)


schema = ds.schema
float_types = (pa.float32(), pa.float16())
check(schema.field("id").type == pa.utf8(), "id is utf8")
check(schema.field("caption").type == pa.utf8(), "caption is utf8")
check(pa.types.is_list(schema.field("latent").type) and schema.field("latent").type.value_type in float_types, "latent list<float>")
check(schema.field("latent_shape").type == pa.list_(pa.int32(), 3) or
      (pa.types.is_fixed_size_list(schema.field("latent_shape").type) and schema.field("latent_shape").type.list_size == 3),
      "latent_shape fixed_size_list<int32>[3]")
check(pa.types.is_list(schema.field("prompt_embeds").type), "prompt_embeds list<float>")
check(schema.field("prompt_len").type == pa.int32(), "prompt_len int32")
for key in ["format_version", "resolution", "max_sequence_length", "complex_human_instruction", "vae_scaling_factor",
            "text_hidden_size", "latent_dtype", "embed_dtype", "negative_prompt_len",
            "negative_prompt_embeds_f32le_b64", "models", "preprocess"]:
    check(key in cfg, f"sprint.config has {key}")
check(cfg["format_version"] in (1, 2), "format_version 1 (square) or 2 (aspect-ratio buckets)")
if cfg["format_version"] == 2:
    buckets = cfg.get("multi_scale", {}).get("buckets", [])
    check(buckets, "format 2 has multi_scale.buckets")
    shapes = {tuple(b["latent_shape"]) for b in buckets}
else:
    shapes = {tuple(cfg["latent_shape"])} if "latent_shape" in cfg else None
table = ds.to_table()
ids = table.column("id").to_pylist()
check(len(ids) == len(set(ids)), "ids unique")
check(all("#" in i and "/" not in i for i in ids), "ids are <file name>#<row>")
for r in table.to_pylist():
    check(len(r["latent"]) == int(np.prod(r["latent_shape"])), "latent length = C*H*W")
    check(shapes is None or tuple(r["latent_shape"]) in shapes, "latent_shape is the store's (a bucket's)")
    check(len(r["prompt_embeds"]) == r["prompt_len"] * cfg["text_hidden_size"], "prompt_embeds = prompt_len*D")
check(np.isfinite(latent).all() and np.isfinite(emb).all() and np.isfinite(neg).all(), "finite values")
print(f"OK: {ds.count_rows()} rows, latent {latent.shape}, prompt_embeds {emb.shape}, negative {neg.shape}, "
      f"lance version {ds.version}, pylance {lance.__version__}")
