"""Compares two sana-sprint latent stores row by row, by id, with pylance (either may be an s3:// URI; the
endpoint and credentials come from the AWS_* variables, as for sprint-prep).

    python tools/compare_stores.py A.lance B.lance [--latent-tol 1e-5] [--embed-tol 1e-3]

Same ids (each once), captions, shapes and prompt lengths; latents and prompt embeddings equal within the
given relative tolerances (|a - b| <= tol * max(|b|, 1)). Exits non-zero with the first difference.
"""
import argparse
import sys

import lance
from lance_s3 import storage_options  # tools/lance_s3.py
import numpy as np


def rows(path):
    table = lance.dataset(path, storage_options=storage_options(path)).to_table()
    out = {}
    for r in table.to_pylist():
        if r["id"] in out:
            sys.exit(f"FAIL: {path}: id {r['id']} stored twice")
        out[r["id"]] = r
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--latent-tol", type=float, default=1e-5)
    ap.add_argument("--embed-tol", type=float, default=1e-3)
    args = ap.parse_args()
    a, b = rows(args.a), rows(args.b)
    if sorted(a) != sorted(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        sys.exit(f"FAIL: ids differ: {len(only_a)} only in {args.a} (e.g. {only_a[:3]}), "
                 f"{len(only_b)} only in {args.b} (e.g. {only_b[:3]})")
    for i in sorted(a):
        x, y = a[i], b[i]
        for key in ("caption", "latent_shape", "prompt_len"):
            if x[key] != y[key]:
                sys.exit(f"FAIL: {i}: {key} {x[key]!r} vs {y[key]!r}")
        for key, tol in (("latent", args.latent_tol), ("prompt_embeds", args.embed_tol)):
            u = np.asarray(x[key], dtype=np.float32)
            v = np.asarray(y[key], dtype=np.float32)
            worst = np.max(np.abs(u - v) / np.maximum(np.abs(v), 1.0)) if u.size else 0.0
            if u.shape != v.shape or worst > tol:
                sys.exit(f"FAIL: {i}: {key} differs (relative {worst:.3e} > {tol:.1e})")
    print(f"OK: {len(a)} rows equal ({args.a} vs {args.b})")


if __name__ == "__main__":
    main()
