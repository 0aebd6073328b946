"""PyTorch reference timing for benches/dcae.rs: the real-size SANA DC-AE encoder (random init), f32, CPU.

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1. Run from the repository root, right before or after
`cargo bench --profile dev --bench dcae` so that both see the same machine load:
    /work/venv/bin/python tools/golden/bench_dcae.py [--size 512] [--batch 1] [--runs 3] [--threads N]
--threads defaults to the number of CPUs (the Rust side uses rayon's default, one thread per CPU).
"""
import argparse
import os
import statistics
import time

import torch

SANA_VAE = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    downsample_block_type="Conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)


def main():
    from diffusers import AutoencoderDC

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = AutoencoderDC(**SANA_VAE).encoder.eval()
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    times, cpu = [], []
    with torch.no_grad():
        encoder(x)  # warm-up
        for _ in range(args.runs):
            t0, c0 = time.perf_counter(), time.process_time()
            latent = encoder(x)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    print(f"pytorch {torch.__version__} DC-AE encoder {args.batch}x3x{args.size}x{args.size} f32 cpu, "
          f"{args.threads} threads: median {statistics.median(times):.3f} s wall over {args.runs} runs "
          f"({', '.join(f'{t:.3f}' for t in times)}), median {statistics.median(cpu):.2f} CPU-s per run; "
          f"latent {tuple(latent.shape)}")


if __name__ == "__main__":
    main()
