"""Golden fixture for the DC-AE code paths that SANA's config does not use (tests/golden_dcae.rs).

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1, safetensors (any). Run from the repository root:
    /work/venv/bin/python tools/golden/make_golden_dcae_variants.py tests/fixtures
Writes dcae_variant_tiny.{safetensors,json} in the layout of make_golden.py (weights under their real
`AutoencoderDC` key names, inputs/outputs under "io.*", the config in the json). The config exercises: an empty
first stage (conv_in / conv_out become resampling blocks), pixel_unshuffle / pixel_shuffle resampling,
BatchNorm2d (eval) in decoder ResBlocks and an EfficientViT attention, relu / gelu decoder activations, two
multiscale kernels, an EfficientViT block without multiscale branch, disabled in/out shortcuts, a batch of 2,
and both attention branches (linear at 4x4, quadratic at 2x2).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

torch.set_grad_enabled(False)
OUT = sys.argv[1] if len(sys.argv) > 1 else "golden"
os.makedirs(OUT, exist_ok=True)


def main():
    from diffusers import AutoencoderDC

    cfg = dict(in_channels=3, latent_channels=4, attention_head_dim=4,
               encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
               decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
               encoder_block_out_channels=[8, 8, 16, 16], decoder_block_out_channels=[8, 8, 16, 16],
               encoder_layers_per_block=[0, 1, 1, 1], decoder_layers_per_block=[0, 1, 1, 2],
               encoder_qkv_multiscales=[[], [], [3, 5], [5]], decoder_qkv_multiscales=[[], [], [], [3]],
               downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
               decoder_norm_types=["batch_norm", "batch_norm", "batch_norm", "rms_norm"],
               decoder_act_fns=["relu", "gelu", "silu", "silu"], encoder_out_shortcut=False,
               decoder_in_shortcut=False, decoder_conv_act_fn="silu", scaling_factor=0.5)
    torch.manual_seed(3)
    ae = AutoencoderDC(**cfg).eval()
    for name, p in ae.named_parameters():
        if "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
    for name, b in ae.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn_like(b))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand_like(b))
    # 16x16 -> 2x2 latent: encoder EViT stages at 4x4 (linear) and 2x2 (quadratic), decoder at 2x2 and 4x4.
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    latent = ae.encode(x).latent
    decoded = ae.decode(latent).sample
    tensors = {k: v.detach().contiguous().clone() for k, v in ae.state_dict().items()}
    tensors.update({"io.image": x, "io.latent": latent.contiguous(), "io.decoded": decoded.contiguous()})
    save_file(tensors, os.path.join(OUT, "dcae_variant_tiny.safetensors"))
    with open(os.path.join(OUT, "dcae_variant_tiny.json"), "w") as f:
        json.dump({"config": cfg}, f, indent=2)
    print("wrote dcae_variant_tiny", sum(t.numel() for t in tensors.values()), "values")


if __name__ == "__main__":
    main()
