"""Resolve the config fixtures of tests/fixtures/configs/ with the real diffusers / transformers classes.

Each `dcae_*.json`, `sana_*.json` and `gemma2_*.json` there (except dcae_f32c32_sana_vae.json, a real key-list
config) is a config.json in a spelling or with optional fields that the reference accepts (or, `*_refused_*`,
one it builds into a network we do not implement, or refuses itself). This script instantiates the reference
class from each file and writes what it resolved to tests/fixtures/configs/resolved.json, which
tests/suite/configs.rs compares with our parse.

Run with a Python that has torch + diffusers + transformers (CPU is enough):
    python tools/golden/make_config_fixtures.py tests/fixtures/configs
"""
import glob
import json
import os
import sys

import torch

torch.set_grad_enabled(False)
DIR = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/configs"
SKIP = {"dcae_f32c32_sana_vae.json", "resolved.json"}


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def dcae(cfg):
    from diffusers import AutoencoderDC
    from diffusers.models.autoencoders.autoencoder_dc import DCDownBlock2d, DCUpBlock2d, ResBlock

    m = AutoencoderDC.from_config(cfg)
    downs = [b for b in m.encoder.modules() if isinstance(b, DCDownBlock2d)]
    ups = [b for b in m.decoder.modules() if isinstance(b, DCUpBlock2d)]
    dec_res = [b for b in m.decoder.modules() if isinstance(b, ResBlock)]
    return {
        "downsample_pixel_unshuffle": sorted({b.downsample for b in downs}),
        "upsample_interpolate": sorted({b.interpolate for b in ups}),
        "decoder_resblock_norms": sorted({type(b.norm).__name__ for b in dec_res}),
        "decoder_resblock_acts": sorted({type(b.nonlinearity).__name__ for b in dec_res}),
        "decoder_conv_act": type(m.decoder.conv_act).__name__,
        "scaling_factor": m.config.scaling_factor,
        "spatial_compression": m.spatial_compression_ratio,
        "shapes": shapes(m),
    }


def sana(cfg):
    from diffusers import SanaTransformer2DModel

    m = SanaTransformer2DModel.from_config(cfg)
    attn1 = m.transformer_blocks[0].attn1
    return {
        "out_channels": m.proj_out.out_features // (m.config.patch_size ** 2),
        "guidance_embedder": type(m.time_embed).__name__ == "SanaCombinedTimestepGuidanceEmbeddings",
        "pos_embed": m.patch_embed.pos_embed is not None,
        "sample_size": m.config.sample_size,
        "qk_norm": m.config.qk_norm,
        "norm_q": type(attn1.norm_q).__name__ if attn1.norm_q is not None else None,
        "attention_bias": attn1.to_q.bias is not None,
        "norm2_affine": m.transformer_blocks[0].norm2.elementwise_affine,
        "shapes": shapes(m),
    }


def gemma2(cfg):
    from transformers import Gemma2Config, Gemma2Model

    c = Gemma2Config(**cfg)
    m = Gemma2Model(c)
    rope = c.rope_parameters
    return {
        "layer_types": c.layer_types,
        "rope_type": rope.get("rope_type", "default"),
        "rope_theta": rope["rope_theta"],
        "sliding_window": c.sliding_window,
        "attn_logit_softcapping": c.attn_logit_softcapping,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "hidden_activation": c.hidden_activation,
        "head_dim": c.head_dim,
        "mlp_act": type(m.layers[0].mlp.act_fn).__name__,
    }


out = {}
for path in sorted(glob.glob(os.path.join(DIR, "*.json"))):
    name = os.path.basename(path)
    if name in SKIP:
        continue
    cfg = json.load(open(path))
    fn = {"dcae": dcae, "sana": sana, "gemma2": gemma2}[name.split("_")[0]]
    try:
        out[name] = {"built": True, **fn(dict(cfg))}
    except Exception as e:  # the reference refuses it
        out[name] = {"built": False, "error": f"{type(e).__name__}: {e}"}
    print(name, "built" if out[name]["built"] else out[name]["error"])
with open(os.path.join(DIR, "resolved.json"), "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
    f.write("\n")
