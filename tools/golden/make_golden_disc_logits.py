"""Golden fixture for the LADD discriminator logits on a tapped teacher, with gradients (tests/golden_disc_loss.rs).

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1, safetensors (any). Run from the repository root, after
make_golden.py has written the fixtures it reads:
    /work/venv/bin/python tools/golden/make_golden_disc_logits.py tests/fixtures
Reads the tiny teacher (`teacher.*` of sana_transformer_tiny.safetensors: 2 blocks, inner dim 16) and the two
tiny heads of disc_heads_tiny.safetensors (C = 16, state dict before any power iteration), and reproduces
`SanaMSCMDiscriminator.forward` of train_sana_sprint_diffusers.py: the TrigFlow teacher wrapper runs on
(x, t, y, mask) of the transformer fixture with forward hooks on blocks 0 and 1 (head k <- k-th hooked block in
execution order); each feature (B, N, D) is transposed to (B, D, N), goes through its head, (B, 1, N) ->
(B, N); logits = concat over heads (B, 2N). Float32, heads exactly as make_golden.py's fixture_disc_head.

Writes disc_logits_tiny.{safetensors,json}: io.logits_eval (heads in eval mode: stored u, v), io.grad_x and
io.grad.{param} = gradients of sum(logits_eval * io.cotangent) w.r.t. x and every head parameter; then, heads
in train mode (one power iteration per spectral conv), io.logits_train, io.grad_train.{param} and the updated
buffers io.after.{k}.*_u / *_v. No weights are stored (they are in the two fixtures read).
"""
import json
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else "golden"
TCFG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
            sample_size=4, qk_norm="rms_norm_across_heads", mlp_ratio=2.5)
BLOCK_IDS = [0, 1]


def make_heads(c, n):
    """The heads of make_golden.py fixture_disc_head (SanaMSCMDiscriminator's DiscHead, c_dim = 0)."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    def sconv(cin, cout, k, circular):
        conv = nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular" if circular else "zeros")
        SpectralNorm.apply(conv, name="weight", n_power_iterations=1, dim=0, eps=1e-12)
        return conv

    class BNLocal(nn.Module):
        def __init__(self, c, vbs=8, eps=1e-5):
            super().__init__()
            self.vbs, self.eps = vbs, eps
            self.weight = nn.Parameter(torch.ones(c))
            self.bias = nn.Parameter(torch.zeros(c))

        def forward(self, x):
            shape = x.shape
            g = math.ceil(x.shape[0] / self.vbs)
            x = x.view(g, -1, x.shape[-2], x.shape[-1])
            mu = x.mean([1, 3], keepdim=True)
            var = x.var([1, 3], keepdim=True, unbiased=False)
            x = (x - mu) / torch.sqrt(var + self.eps)
            return (x * self.weight[None, :, None] + self.bias[None, :, None]).view(shape)

    class Res(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return (self.fn(x) + x) / math.sqrt(2)

    def block(c, k):
        return nn.Sequential(sconv(c, c, k, True), BNLocal(c), nn.LeakyReLU(0.2))

    class Head(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.main = nn.Sequential(block(c, 1), Res(block(c, 9)))
            self.cls = sconv(c, 1, 1, False)

        def forward(self, x):
            return self.cls(self.main(x))

    return nn.ModuleList([Head(c) for _ in range(n)])


def trigflow_teacher(model, x, t, y, mask):
    """SanaTrigFlow.forward without guidance/logvar, fp32 (docs/ALGORITHM.md §5.3)."""
    tau = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    tt = tau.view(-1, 1, 1, 1)
    rho = torch.sqrt(tt ** 2 + (1 - tt) ** 2)
    xin = x * rho
    v = model(hidden_states=xin, encoder_hidden_states=y, timestep=tau, encoder_attention_mask=mask).sample
    return ((1 - 2 * tt) * xin + (1 - 2 * tt + 2 * tt ** 2) * v) / rho


def main():
    from diffusers import SanaTransformer2DModel

    tiny = load_file(os.path.join(OUT, "sana_transformer_tiny.safetensors"))
    head_sd = load_file(os.path.join(OUT, "disc_heads_tiny.safetensors"))
    teacher = SanaTransformer2DModel(guidance_embeds=False, **TCFG).eval()
    teacher.load_state_dict({k[len("teacher."):]: v for k, v in tiny.items() if k.startswith("teacher.")}, strict=True)
    teacher.requires_grad_(False)
    heads = make_heads(16, len(BLOCK_IDS))
    heads.load_state_dict({k: v for k, v in head_sd.items() if not k.startswith("io.")}, strict=True)

    features = []
    for i in BLOCK_IDS:
        teacher.transformer_blocks[i].register_forward_hook(lambda m, inp, out: features.append(out))

    x0, y, mask, t = tiny["io.x"], tiny["io.y"], tiny["io.mask"], tiny["io.t"]
    torch.manual_seed(5)

    def disc_logits():
        features.clear()
        x = x0.clone().requires_grad_(True)
        trigflow_teacher(teacher, x, t, y, mask)
        outs = []
        for head, f in zip(heads, features):
            b, n, _ = f.shape
            outs.append(head(f.transpose(1, 2)).reshape(b, n))
        return x, torch.cat(outs, dim=1)

    io = {}
    heads.eval()
    x, logits = disc_logits()
    cotangent = torch.randn_like(logits)
    params = dict(heads.named_parameters())
    grads = torch.autograd.grad((logits * cotangent).sum(), [x] + list(params.values()))
    io.update(cotangent=cotangent, logits_eval=logits, grad_x=grads[0])
    io.update({"grad." + k: g for k, g in zip(params, grads[1:])})

    heads.train()
    x, logits = disc_logits()
    grads = torch.autograd.grad((logits * cotangent).sum(), list(params.values()))
    io["logits_train"] = logits
    io.update({"grad_train." + k: g for k, g in zip(params, grads)})
    io.update({"after." + k: v for k, v in heads.state_dict().items() if k.endswith("_u") or k.endswith("_v")})

    save_file({"io." + k: v.detach().contiguous().clone() for k, v in io.items()},
              os.path.join(OUT, "disc_logits_tiny.safetensors"))
    meta = dict(block_ids=BLOCK_IDS, teacher="teacher.* of sana_transformer_tiny.safetensors (io.x, io.y, io.mask, "
                "io.t as the discriminator input)", heads="disc_heads_tiny.safetensors (state dict before any "
                "power iteration)", note="grad* = gradients of sum(logits * io.cotangent); param names are the "
                "heads' state-dict names")
    with open(os.path.join(OUT, "disc_logits_tiny.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print("wrote disc_logits_tiny", sum(v.numel() for v in io.values()), "values")


if __name__ == "__main__":
    main()
