"""Checks that an exported transformer folder loads in diffusers and that diffusers and the Rust model agree on it.

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1, safetensors (any). Run from anywhere:
    /work/venv/bin/python tools/verify_export.py TRANSFORMER_DIR [--rust-bin PATH] [--tol 1e-4]
TRANSFORMER_DIR is a diffusers folder (config.json + diffusion_pytorch_model*.safetensors), e.g. a teacher
`transformer/` or the student the trainer exports (`_class_name` SanaTrigFlow or SanaTransformer2DModel,
`guidance_embeds` true, extra keys logvar_linear.*).

(a) Loads it with `SanaTransformer2DModel.from_pretrained(dir, output_loading_info=True)` and prints what
    diffusers reports (loading info and any log / warning lines); fails unless missing_keys is empty and the
    unexpected keys are a subset of {logvar_linear.weight, logvar_linear.bias}.
(b) Draws deterministic inputs (x, y, mask with a padded tail on the last sample, flow timestep, and guidance
    for a guidance_embeds model), runs the diffusers forward (default processors: ReLU linear self-attention,
    SDPA cross-attention; float32) and the Rust model (`examples/sana_forward.rs`, by default through
    `cargo run --example sana_forward` in the repository root; set CARGO_TARGET_DIR as usual), and prints max abs
    and relative (max abs / max |diffusers|) error. Exit status 1 if (a) fails or rel > --tol.
"""
import argparse
import io
import logging
import os
import subprocess
import sys
import tempfile
import warnings

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED_UNEXPECTED = {"logvar_linear.weight", "logvar_linear.bias"}


def load_with_report(path):
    """from_pretrained with loading info, capturing diffusers' log lines and python warnings."""
    import diffusers
    from diffusers import SanaTransformer2DModel

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.INFO)
    diffusers.utils.logging.get_logger("diffusers").addHandler(handler)
    diffusers.utils.logging.set_verbosity_info()
    diffusers.utils.logging.disable_default_handler()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = SanaTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32,
                                                                 output_loading_info=True)
    finally:
        diffusers.utils.logging.get_logger("diffusers").removeHandler(handler)
        diffusers.utils.logging.enable_default_handler()
        diffusers.utils.logging.set_verbosity_warning()
    return model.eval(), info, log.getvalue(), [str(w.message) for w in caught]


def make_inputs(cfg, batch, size, seq_len, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(batch, cfg.in_channels, size, size, generator=gen),
        y=torch.randn(batch, seq_len, cfg.caption_channels, generator=gen),
        mask=torch.ones(batch, seq_len),
        timestep=torch.rand(batch, generator=gen) * 0.9 + 0.05,
    )
    inputs["mask"][-1, seq_len // 2 + 1:] = 0
    if cfg.guidance_embeds:
        cfg_scales = torch.tensor([4.0, 4.5, 5.0])
        inputs["guidance"] = cfg_scales[torch.arange(batch) % 3] * cfg.guidance_embeds_scale
    return inputs


def run_rust(rust_bin, model_dir, input_path, output_path):
    args = [os.path.abspath(model_dir), input_path, output_path]
    cmd = [rust_bin] + args if rust_bin else ["cargo", "run", "--quiet", "--example", "sana_forward", "--"] + args
    print("running:", " ".join(cmd))
    status = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    return load_file(output_path)["out"] if status == 0 else status


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("transformer_dir")
    ap.add_argument("--rust-bin", help="a built sana_forward example binary (default: cargo run --example)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest accepted relative error")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=4, help="latent height = width")
    ap.add_argument("--seq-len", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ok = True
    model, info, log, caught = load_with_report(args.transformer_dir)
    print("(a) diffusers SanaTransformer2DModel.from_pretrained(output_loading_info=True):")
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        print(f"    {key}: {sorted(info.get(key, []))}")
    for line in filter(str.strip, log.splitlines()):
        print("    diffusers log:", line)
    for message in caught:
        print("    warning:", message)
    print(f"    guidance_embeds: {model.config.guidance_embeds}")
    unexpected = set(info.get("unexpected_keys", []))
    if info.get("missing_keys") or not unexpected <= ALLOWED_UNEXPECTED or info.get("mismatched_keys") \
            or info.get("error_msgs"):
        print("    FAIL: missing keys, unexpected keys beyond logvar_linear.*, shape mismatches or errors")
        ok = False
    else:
        print("    ok: no missing keys; unexpected keys within {logvar_linear.weight, logvar_linear.bias}")

    inputs = make_inputs(model.config, args.batch, args.size, args.seq_len, args.seed)
    with torch.no_grad():
        ref = model(hidden_states=inputs["x"], encoder_hidden_states=inputs["y"], timestep=inputs["timestep"],
                    guidance=inputs.get("guidance"), encoder_attention_mask=inputs["mask"]).sample
    with tempfile.TemporaryDirectory() as tmp:
        input_path, output_path = os.path.join(tmp, "input.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, input_path)
        out = run_rust(args.rust_bin, args.transformer_dir, input_path, output_path)
    if isinstance(out, int):
        print(f"(b) FAIL: the Rust forward exited with status {out}")
        return 1
    if out.shape != ref.shape:
        print(f"(b) FAIL: Rust output shape {tuple(out.shape)} != diffusers {tuple(ref.shape)}")
        return 1
    max_abs = (out - ref).abs().max().item()
    rel = max_abs / ref.abs().max().item()
    print(f"(b) forward {tuple(ref.shape)}, guidance {'given' if 'guidance' in inputs else 'none'}: "
          f"max |diffusers| {ref.abs().max().item():.4g}, max abs err {max_abs:.3g}, rel err {rel:.3g} "
          f"(tol {args.tol:g})")
    if not rel <= args.tol:
        print("    FAIL: relative error above tolerance")
        ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
