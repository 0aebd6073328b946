"""Gemma-2 fixture whose attention scores reach the attention-logit softcap (tests/suite/golden_gemma2.rs).

`gemma2_tiny` (make_golden.py) caps at 50 but its scores stay far below that, so a missing or wrong softcap would
still match. Here the cap is 2.0 and the q/k projections are scaled up, so most scores exceed the cap; the
reference is transformers' `Gemma2Model` with eager attention (the only implementation that applies the softcap).

Run with a Python that has torch + transformers + safetensors (CPU is enough):
    python make_golden_gemma2_softcap.py tests/fixtures
Writes gemma2_softcap_tiny.safetensors (weights under their transformers names, inputs/outputs under "io.") and
gemma2_softcap_tiny.json (config + statistics of the raw scores).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2Model
from transformers.models.gemma2 import modeling_gemma2

torch.set_grad_enabled(False)
OUT = sys.argv[1] if len(sys.argv) > 1 else "golden"
os.makedirs(OUT, exist_ok=True)

CAP = 2.0
QK_SCALE = 15.0
cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
           attn_logit_softcapping=CAP, rms_norm_eps=1e-6)


def build(softcap):
    config = Gemma2Config(**{**cfg, "attn_logit_softcapping": softcap})
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    m = Gemma2Model(config).eval()
    for n, p in m.named_parameters():
        if "norm" in n:
            p.add_(0.1 * torch.randn_like(p))
        if "q_proj" in n or "k_proj" in n:
            p.mul_(QK_SCALE)
    return m


# Record the raw (pre-cap) scores of every layer through the eager attention function the model calls.
raw_scores = []
_eager = modeling_gemma2.eager_attention_forward


def recording_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    k = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
    raw_scores.append((query @ k.transpose(2, 3)) * scaling)
    return _eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kw)


modeling_gemma2.eager_attention_forward = recording_eager
for layer in build(CAP).layers:
    assert layer.self_attn.config._attn_implementation == "eager"

ids = torch.tensor([[2, 10, 11, 12, 13, 14, 0, 0], [2, 20, 21, 22, 0, 0, 0, 0]])
mask = (ids != 0).long()
mask[:, 0] = 1
m = build(CAP)
out = m(ids, attention_mask=mask).last_hidden_state
scores = torch.cat([s.flatten() for s in raw_scores])
raw_scores.clear()
uncapped = build(None)(ids, attention_mask=mask).last_hidden_state
modeling_gemma2.eager_attention_forward = _eager

tensors = {k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}
tensors["io.input_ids"] = ids.float()
tensors["io.attention_mask"] = mask.float()
tensors["io.last_hidden_state"] = out.contiguous()
save_file(tensors, os.path.join(OUT, "gemma2_softcap_tiny.safetensors"))
meta = {
    "config": cfg,
    "qk_weight_scale": QK_SCALE,
    "max_abs_raw_score": scores.abs().max().item(),
    "fraction_raw_scores_above_cap": (scores.abs() > CAP).float().mean().item(),
    "max_abs_diff_without_softcap": (out - uncapped).abs().max().item(),
    "note": "transformers Gemma2Model, eager attention; q_proj/k_proj weights scaled by qk_weight_scale after init so "
            "that the raw scores exceed attn_logit_softcapping; max_abs_diff_without_softcap is the same model run "
            "with attn_logit_softcapping=None (all weights equal).",
}
with open(os.path.join(OUT, "gemma2_softcap_tiny.json"), "w") as f:
    json.dump(meta, f, indent=2)
print(json.dumps({k: v for k, v in meta.items() if k != "note"}, indent=2))
