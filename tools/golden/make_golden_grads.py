"""Golden fixture for reverse-mode gradients through the student and the frozen teacher (tests/golden_grads.rs).

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1, safetensors (any). Run from the repository root, after
make_golden.py has written the fixture it reads:
    /work/venv/bin/python tools/golden/make_golden_grads.py tests/fixtures
Reads the tiny transformer fixture (sana_transformer_tiny.safetensors: 2 blocks, inner dim 16, the config TCFG
below) and its inputs io.x, io.y, io.mask, io.t, io.guidance. Everything is float32 autograd on the CPU.

Student: SanaTransformer2DModel(guidance_embeds=True) with the `student.*` weights and its default attention
processors (ReLU linear self-attention, SDPA cross-attention), plus `logvar_linear` = nn.Linear(16, 1) with the
`student.logvar_linear.*` weights, run through the SanaTrigFlow wrapper maths of train_sana_sprint_diffusers.py
(docs/ALGORITHM.md §5.3; fp32, no dtype casts). Loss
    L_student = sum(F * io.student_cotangent) + sum(logvar * io.logvar_cotangent)
Writes io.student_grad.{param} for every student parameter (logvar_linear included), io.student_grad_x and
io.student_grad_t (d L / d x, d L / d t; t feeds both the wrapper and the logvar time embedding).

Teacher: SanaTransformer2DModel(guidance_embeds=False) with the `teacher.*` weights, frozen, default processors,
through the wrapper without guidance. Loss (the adversarial term needs d/dx through the tapped trunk)
    L_teacher = sum(F_teacher * io.teacher_cotangent) + sum_k sum(block_k(x) * io.teacher_tap_cotangent.{k})
with block_k the outputs (B, N, D) of transformer_blocks[k] for k in TAPS. Writes io.teacher_grad_x.
The losses themselves are stored as io.student_loss and io.teacher_loss. No weights are stored.
"""
import json
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else "golden"
TCFG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
            sample_size=4, qk_norm="rms_norm_across_heads", mlp_ratio=2.5)
TAPS = [0, 1]


def trigflow(model, x, t, y, mask, g):
    """F of SanaTrigFlow.forward (docs/ALGORITHM.md §5.3) in fp32 without dtype casts."""
    tau = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    tt = tau.view(-1, 1, 1, 1)
    rho = torch.sqrt(tt ** 2 + (1 - tt) ** 2)
    xin = x * rho
    v = model(hidden_states=xin, encoder_hidden_states=y, timestep=tau, guidance=g,
              encoder_attention_mask=mask).sample
    out = ((1 - 2 * tt) * xin + (1 - 2 * tt + 2 * tt ** 2) * v) / rho
    return out


def main():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(11)
    tiny = load_file(os.path.join(OUT, "sana_transformer_tiny.safetensors"))
    x0, y, mask, t0, g = (tiny["io." + k] for k in ("x", "y", "mask", "t", "guidance"))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tiny.items() if k.startswith(prefix)}

    student_sd = part("student.")
    logvar = nn.Linear(16, 1)
    logvar.load_state_dict({k[len("logvar_linear."):]: student_sd.pop(k)
                            for k in list(student_sd) if k.startswith("logvar_linear.")}, strict=True)
    student = SanaTransformer2DModel(guidance_embeds=True, **TCFG).eval()
    student.load_state_dict(student_sd, strict=True)

    x = x0.clone().requires_grad_(True)
    t = t0.clone().requires_grad_(True)
    f = trigflow(student, x, t, y, mask, g)
    _, emb = student.time_embed(t, guidance=g, hidden_dtype=x.dtype)
    lv = logvar(emb)
    f_cot, lv_cot = torch.randn_like(f), torch.randn_like(lv)
    student_loss = (f * f_cot).sum() + (lv * lv_cot).sum()
    params = {**dict(student.named_parameters()),
              **{"logvar_linear." + k: p for k, p in logvar.named_parameters()}}
    assert set(params) == set(student_sd) | {"logvar_linear.weight", "logvar_linear.bias"}
    grads = torch.autograd.grad(student_loss, [x, t] + list(params.values()))
    io = dict(student_cotangent=f_cot, logvar_cotangent=lv_cot, student_loss=student_loss.reshape(1),
              student_grad_x=grads[0], student_grad_t=grads[1])
    io.update({"student_grad." + k: gr for k, gr in zip(params, grads[2:])})

    teacher = SanaTransformer2DModel(guidance_embeds=False, **TCFG).eval()
    teacher.load_state_dict(part("teacher."), strict=True)
    teacher.requires_grad_(False)
    taps = {}
    for k in TAPS:
        teacher.transformer_blocks[k].register_forward_hook(lambda m, inp, out, k=k: taps.__setitem__(k, out))
    x = x0.clone().requires_grad_(True)
    f = trigflow(teacher, x, t0, y, mask, None)
    f_cot = torch.randn_like(f)
    teacher_loss = (f * f_cot).sum()
    for k in TAPS:
        cot = torch.randn_like(taps[k])
        io["teacher_tap_cotangent.%d" % k] = cot
        teacher_loss = teacher_loss + (taps[k] * cot).sum()
    (grad_x,) = torch.autograd.grad(teacher_loss, [x])
    io.update(teacher_cotangent=f_cot, teacher_loss=teacher_loss.reshape(1), teacher_grad_x=grad_x)

    save_file({"io." + k: v.detach().contiguous().clone() for k, v in io.items()},
              os.path.join(OUT, "sana_grads_tiny.safetensors"))
    meta = dict(config=TCFG, taps=TAPS,
                inputs="io.x, io.y, io.mask, io.t, io.guidance and the student.*/teacher.* weights of "
                       "sana_transformer_tiny.safetensors",
                student_loss="sum(F * student_cotangent) + sum(logvar * logvar_cotangent); student: guidance "
                             "embedder, linear self-attention, SDPA cross-attention, logvar of the time "
                             "embedding of t (with guidance)",
                teacher_loss="sum(F_teacher * teacher_cotangent) + sum_k sum(block_k * teacher_tap_cotangent.k)",
                note="student_grad.{name} = d L_student / d parameter under its state-dict name; float32")
    with open(os.path.join(OUT, "sana_grads_tiny.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    print("wrote sana_grads_tiny", sum(v.numel() for v in io.values()), "values")


if __name__ == "__main__":
    main()
