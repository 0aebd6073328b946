"""Golden fixture for one full training iteration: a phase-G (student) step and a phase-D (heads) step.

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1, safetensors (any). Run from the repository root:
    /work/venv/bin/python tools/golden/make_golden_step.py tests/fixtures [--export-student DIR]
Writes tests/fixtures/train_step_tiny.{safetensors,json} (contract: notes/step-contract.md). With
--export-student DIR it also writes the student after the G step as a diffusers folder (config.json with
`_class_name: SanaTrigFlow`, `guidance_embeds: true`; weights incl. logvar_linear.*), as the training script's
final export does — input for tools/verify_export.py. With --hw H W it writes the slim non-square fixture
train_step_tiny_HxW.{safetensors,json} (tests/fixtures has 4x2 and 2x6: the aspect-ratio buckets' shapes).

What it states: the reference maths of train_sana_sprint_diffusers.py (docs/ALGORITHM.md §5.2–§5.8) with the *recommended*
fixes of docs/ALGORITHM.md §9, in float32 on the CPU, with every random draw injected (stored under g.* / d.*, read back
by the Rust test, never drawn by torch inside the maths):
  #1 student self-attention stays diffusers' ReLU linear attention; only the cross-attention (attn2) gets a
     plain math softmax processor (same maths as SDPA; needed because torch.func.jvp has no rule for the fused
     SDPA kernels); #2 guidance embedder linear_1.weight ~ N(0, 0.02), linear_1.bias = 0, linear_2 = 0;
  #3 fp32 weights, optimizer state and compute; #4 phase-G head gradients are not computed (heads frozen in G);
  #5 phase-D largest timestep = 1.5708; #6 misaligned pairs with B > 1: doubled prompts for the fake call only;
  #9 logvar head fed the time embedding of the TrigFlow t (diffusers behaviour); #10 time / CFG maths in f32;
  #14 heads get 10 power iterations after init (before the G step, which runs them in eval mode).
The teacher is datasets/tiny-sana-sprint/transformer (not stored again); the initial student and heads are
stored (student.*, heads.*). G and D both start from the initial student and heads (independent checks).
Sanity checks (asserts): the initial student equals the teacher (guidance has no effect at init: linear_2 = 0);
on an f64 copy of the student the JVP satisfies <u, J v> = <J^T u, v> against reverse mode and matches a central
finite difference; the f32 JVP matches the f64 JVP.
"""
import argparse
import copy
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden_disc_logits import make_heads  # noqa: E402  (the DiscHead / SpectralNorm statements)

TEACHER_DIR = "datasets/tiny-sana-sprint/transformer"
SIGMA_DATA = 0.5
STUDENT_SAMPLER = (0.2, 1.6)  # (mean, std) of compute_density_for_timestep_sampling_scm
DISC_SAMPLER = (-0.6, 1.0)
HEAD_BLOCK_IDS = [2, 8, 14, 19]
CFG_SCALES = [4.0, 4.5, 5.0]
GUIDANCE_EMBEDS_SCALE = 0.1
LARGEST_TIMESTEP = 1.5708
LARGEST_TIMESTEP_PROB = 0.5
GLOBAL_STEP = 1000
TANGENT_WARMUP_STEPS = 4000
SCM_LAMBDA, ADV_LAMBDA = 1.0, 0.5
TANGENT_NORM_C = 0.1
LR, BETAS, WEIGHT_DECAY, EPS = 1e-3, (0.9, 0.999), 1e-4, 1e-8
GRADIENT_CLIP = 0.1
INIT_POWER_ITERATIONS = 10
B, C, H, W, L = 2, 32, 4, 4, 12


class MathCrossAttnProcessor:
    """diffusers SanaAttnProcessor2_0 with F.scaled_dot_product_attention written out (softmax(q kᵀ/√d + bias) v),
    so that torch.func.jvp can differentiate it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
        if attention_mask is not None:
            scores = scores + attention_mask
        hidden_states = scores.softmax(dim=-1) @ value
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def trigflow(model, x, t, y, mask, guidance=None, logvar_linear=None):
    """SanaTrigFlow.forward (docs/ALGORITHM.md §5.3) in fp32: F, and logvar = logvar_linear(time_embed(t, guidance)[1]) when
    logvar_linear is given."""
    tau = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    tt = tau.view(-1, 1, 1, 1)
    rho = torch.sqrt(tt ** 2 + (1 - tt) ** 2)
    x_in = x * rho
    v = model(hidden_states=x_in, encoder_hidden_states=y, timestep=tau, guidance=guidance,
              encoder_attention_mask=mask).sample
    out = ((1 - 2 * tt) * x_in + (1 - 2 * tt + 2 * tt ** 2) * v) / rho
    if logvar_linear is None:
        return out
    _, emb = model.time_embed(t, guidance=guidance, hidden_dtype=x.dtype)
    return out, logvar_linear(emb)


def sample_t(normal, mean_std):
    """compute_density_for_timestep_sampling_scm with the injected standard-normal draws (0.5 literal, ALGORITHM.md §5.4)."""
    mean, std = mean_std
    return torch.atan(torch.exp(normal * std + mean) / 0.5)


def bc(t):
    return t.view(-1, 1, 1, 1)


class Discriminator:
    """SanaMSCMDiscriminator: the teacher wrapper with forward hooks on HEAD_BLOCK_IDS, one DiscHead per tap."""

    def __init__(self, teacher, heads):
        self.teacher, self.heads, self.features = teacher, heads, []
        for i in HEAD_BLOCK_IDS:
            teacher.transformer_blocks[i].register_forward_hook(lambda m, inp, out: self.features.append(out))

    def __call__(self, x, t, y, mask):
        self.features.clear()
        trigflow(self.teacher, x, t, y, mask)
        assert len(self.features) == len(self.heads)
        outs = []
        for head, f in zip(self.heads, self.features):
            b, n, _ = f.shape
            outs.append(head(f.transpose(1, 2)).reshape(b, n))
        self.features.clear()
        return torch.cat(outs, dim=1)


def build_student(teacher, gen):
    """docs/ALGORITHM.md §5.2 with recommended #2: student (guidance_embeds=True) from the teacher weights + logvar_linear."""
    from diffusers import SanaTransformer2DModel

    cfg = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    cfg["guidance_embeds"] = True
    student = SanaTransformer2DModel.from_config(cfg).float()
    sd = {}
    for k, v in teacher.state_dict().items():
        sd[k.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder.")] = v.clone()
    d = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    ge = "time_embed.guidance_embedder."
    sd[ge + "linear_1.weight"] = torch.randn(d, 256, generator=gen) * 0.02
    sd[ge + "linear_1.bias"] = torch.zeros(d)
    sd[ge + "linear_2.weight"] = torch.zeros(d, d)
    sd[ge + "linear_2.bias"] = torch.zeros(d)
    student.load_state_dict(sd, strict=True)
    for block in student.transformer_blocks:
        block.attn2.set_processor(MathCrossAttnProcessor())
    logvar_linear = nn.Linear(d, 1)
    with torch.no_grad():
        nn.init.xavier_uniform_(logvar_linear.weight, generator=gen)
        logvar_linear.bias.zero_()
    return student, logvar_linear


def student_params(student, logvar_linear):
    return {**dict(student.named_parameters()),
            **{"logvar_linear." + k: p for k, p in logvar_linear.named_parameters()}}


def power_iterate(heads, n):
    """n SpectralNorm power iterations on every spectral conv (updates weight_u / weight_v in place)."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    with torch.no_grad():
        for m in heads.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, SpectralNorm):
                    for _ in range(n):
                        hook.compute_weight(m, do_power_iteration=True)


def draws(gen):
    """Every random input of both phases, float32."""
    lat = (B, C, H, W)

    def n(*shape):
        return torch.randn(*shape, generator=gen)

    def cfg():
        return torch.tensor(CFG_SCALES)[torch.randint(0, len(CFG_SCALES), (B,), generator=gen)]

    def largest_uniform(forced_first):
        # U[0,1) per sample, folded so that this batch exercises both branches (forced_first: sample 0 < 0.5)
        u = torch.rand(B, generator=gen) * 0.5
        return u + torch.tensor([0.0, 0.5] if forced_first else [0.5, 0.0])

    g = dict(noise=n(*lat), t_normal=n(B), cfg=cfg(), t_prime_normal=n(B), largest_uniform=largest_uniform(True),
             noise_prime=n(*lat), t_d_normal=n(B), noise_d=n(*lat))
    d = dict(noise=n(*lat), t_normal=n(B), cfg=cfg(), largest_uniform=largest_uniform(False),
             noise_largest=n(*lat), t_d_normal=n(B), noise_fake=n(*lat), noise_real=n(*lat),
             t_shift_normal=n(B), noise_shift=n(*lat))
    return g, d


def make_batch(gen):
    x0 = torch.randn(B, C, H, W, generator=gen) * SIGMA_DATA
    prompt_embeds = torch.randn(B, L, 64, generator=gen)
    prompt_mask = torch.ones(B, L)
    prompt_mask[1, 7:] = 0
    neg_embeds = torch.randn(1, L, 64, generator=gen).expand(B, L, 64).clone()
    neg_mask = torch.zeros(B, L)
    neg_mask[:, 0] = 1
    return dict(x0=x0, prompt_embeds=prompt_embeds, prompt_mask=prompt_mask, neg_embeds=neg_embeds,
                neg_mask=neg_mask)


def check_jvp(student, primals, tangents, y, mask, guidance, dF32):
    """Checks torch.func.jvp on an f64 copy of the student three ways: against the reverse-mode identity
    <u, J v> = <J^T u, v> (tight), against a central finite difference (h = 1e-3; diffusers keeps the linear
    attention, the timestep features and the RMSNorm variance in f32 even in an f64 model, which limits FD
    accuracy to ~1e-4), and the f32 jvp against the f64 one."""
    s64 = copy.deepcopy(student).double()
    x, t = (p.double() for p in primals)
    vx, vt = (p.double() for p in tangents)
    y64, m64, g64 = y.double(), mask.double(), guidance.double()

    def f(xh, tt):
        return trigflow(s64, xh, tt, y64, m64, g64)

    with torch.no_grad():
        _, dF64 = torch.func.jvp(f, (x, t), (vx, vt))
        h = 1e-3
        fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
    cot = torch.randn(dF64.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    xg, tg = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    gx, gt = torch.autograd.grad((f(xg, tg) * cot).sum(), [xg, tg])
    lhs, rhs = (cot * dF64).sum().item(), ((gx * vx).sum() + (gt * vt).sum()).item()
    err_vjp = abs(lhs - rhs) / (cot.abs() * dF64.abs()).sum().item()
    scale = dF64.abs().max().item()
    err_fd = (dF64 - fd).abs().max().item() / scale
    err_32 = (dF32.double() - dF64).abs().max().item() / scale
    print(f"jvp check (f64 copy): max|dF| {scale:.4g}; <u,Jv> vs <J^T u,v> rel {err_vjp:.3g}; "
          f"central FD (h=1e-3) rel {err_fd:.3g}; f32 jvp vs f64 jvp rel {err_32:.3g}")
    assert err_vjp < 1e-7, err_vjp
    assert err_fd < 2e-3, err_fd
    assert err_32 < 1e-4, err_32


def adamw_step(params, lr=LR):
    opt = torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS, foreach=False)
    opt.step()


def phase_g(teacher, student, logvar_linear, heads, batch, g):
    """docs/ALGORITHM.md §5.6 (recommended column); returns the outputs dict (g.out.*) and the stepped student."""
    sd = SIGMA_DATA
    x0, emb, mask = batch["x0"], batch["prompt_embeds"], batch["prompt_mask"]
    heads.eval()
    heads.requires_grad_(False)  # recommended #4: no adversarial gradient into the heads in phase G
    disc = Discriminator(teacher, heads)
    params = student_params(student, logvar_linear)
    for p in params.values():
        p.grad = None

    t = sample_t(g["t_normal"], STUDENT_SAMPLER)
    x_t = bc(torch.cos(t)) * x0 + bc(torch.sin(t)) * (g["noise"] * sd)
    w = bc(g["cfg"])
    guidance = g["cfg"] * GUIDANCE_EMBEDS_SCALE

    with torch.no_grad():
        f_t = trigflow(teacher, torch.cat([x_t, x_t]) / sd, torch.cat([t, t]),
                       torch.cat([batch["neg_embeds"], emb]), torch.cat([batch["neg_mask"], mask]))
        uncond, cond = (sd * f_t).chunk(2)
        dxt_dt = uncond + w * (cond - uncond)

        cs = torch.cos(t) * torch.sin(t)
        primals = (x_t / sd, t)
        tangents = (bc(cs) * dxt_dt / sd, cs)
        _, dF = torch.func.jvp(lambda xh, tt: trigflow(student, xh, tt, emb, mask, guidance), primals, tangents)
    check_jvp(student, primals, tangents, emb, mask, guidance, dF)

    F_s, logvar = trigflow(student, x_t / sd, t, emb, mask, guidance, logvar_linear)
    F_minus = F_s.detach()
    r = min(1.0, GLOBAL_STEP / TANGENT_WARMUP_STEPS)
    ct, st = bc(torch.cos(t)), bc(torch.sin(t))
    gt = -ct ** 2 * (sd * F_minus - dxt_dt) - r * (ct * st * x_t + sd * dF)
    gt = gt / (torch.linalg.vector_norm(gt, dim=(1, 2, 3), keepdim=True) + TANGENT_NORM_C)
    lv = logvar.view(-1, 1, 1, 1)
    weight = 1 / (torch.tan(bc(t)) * sd)
    scm_loss = ((weight / torch.exp(lv)) * (F_s - F_minus - gt) ** 2 + lv).mean()

    t_prime = sample_t(g["t_prime_normal"], STUDENT_SAMPLER)
    t_prime = torch.where(g["largest_uniform"] < LARGEST_TIMESTEP_PROB, torch.full_like(t_prime, LARGEST_TIMESTEP),
                          t_prime)
    x_prime = bc(torch.cos(t_prime)) * x0 + bc(torch.sin(t_prime)) * (g["noise_prime"] * sd)
    F_prime = trigflow(student, x_prime / sd, t_prime, emb, mask, guidance)
    x0_pred = bc(torch.cos(t_prime)) * x_prime - bc(torch.sin(t_prime)) * sd * F_prime

    t_d = sample_t(g["t_d_normal"], DISC_SAMPLER)
    x_d = bc(torch.cos(t_d)) * x0_pred + bc(torch.sin(t_d)) * (g["noise_d"] * sd)
    logits = disc(x_d / sd, t_d, emb, mask)
    adv_loss = -logits.mean()

    loss = SCM_LAMBDA * scm_loss + ADV_LAMBDA * adv_loss
    loss.backward()
    assert all(p.grad is not None for p in params.values())
    grads = {k: p.grad.clone() for k, p in params.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), GRADIENT_CLIP)
    adamw_step(list(params.values()))

    out = dict(t=t, x_t=x_t, dxt_dt=dxt_dt, dF=dF, F=F_s, logvar=logvar, tangent=gt, t_prime=t_prime,
               x0_pred=x0_pred, t_d=t_d, logits=logits, scm_loss=scm_loss, adv_loss=adv_loss, loss=loss,
               grad_norm=grad_norm)
    out.update({"grad." + k: v for k, v in grads.items()})
    out.update({"student." + k: p for k, p in params.items()})
    return out


def phase_d(teacher, student, logvar_linear, heads, batch, d):
    """docs/ALGORITHM.md §5.7 (recommended column); returns the outputs dict (d.out.*)."""
    sd = SIGMA_DATA
    x0, emb, mask = batch["x0"], batch["prompt_embeds"], batch["prompt_mask"]
    heads.train()
    heads.requires_grad_(True)
    disc = Discriminator(teacher, heads)
    guidance = d["cfg"] * GUIDANCE_EMBEDS_SCALE

    with torch.no_grad():
        t = sample_t(d["t_normal"], STUDENT_SAMPLER)
        t = torch.where(d["largest_uniform"] < LARGEST_TIMESTEP_PROB, torch.full_like(t, LARGEST_TIMESTEP), t)
        x_t = bc(torch.cos(t)) * x0 + bc(torch.sin(t)) * (d["noise_largest"] * sd)
        F_s = trigflow(student, x_t / sd, t, emb, mask, guidance)
        x0_fake = bc(torch.cos(t)) * x_t - bc(torch.sin(t)) * sd * F_s

        t_d = sample_t(d["t_d_normal"], DISC_SAMPLER)
        x_fake = bc(torch.cos(t_d)) * x0_fake + bc(torch.sin(t_d)) * (d["noise_fake"] * sd)
        x_real = bc(torch.cos(t_d)) * x0 + bc(torch.sin(t_d)) * (d["noise_real"] * sd)
        x0_shift = torch.roll(x0, 1, dims=0)
        t_s = sample_t(d["t_shift_normal"], DISC_SAMPLER)
        x_shift = bc(torch.cos(t_s)) * x0_shift + bc(torch.sin(t_s)) * (d["noise_shift"] * sd)

    logits_fake = disc(torch.cat([x_fake, x_shift]) / sd, torch.cat([t_d, t_s]), torch.cat([emb, emb]),
                       torch.cat([mask, mask]))
    logits_real = disc(x_real / sd, t_d, emb, mask)
    d_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    params = dict(heads.named_parameters())
    for p in params.values():
        p.grad = None
    d_loss.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), GRADIENT_CLIP)
    adamw_step(list(params.values()))

    out = dict(t=t, x0_fake=x0_fake, t_d=t_d, t_shift=t_s, logits_fake=logits_fake, logits_real=logits_real,
               d_loss=d_loss, grad_norm=grad_norm)
    out.update({"grad." + k: v for k, v in grads.items()})
    out.update({"heads." + k: v for k, v in heads.state_dict().items()})
    return out


def export_student(path, teacher, params):
    """The student as the training script's final save_pretrained writes it (SanaTrigFlow class name)."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(teacher.config)
    cfg.update(_class_name="SanaTrigFlow", guidance_embeds=True)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k in ("_class_name", "_diffusers_version")}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    save_file({k: v.detach().contiguous().clone() for k, v in params.items()},
              os.path.join(path, "diffusion_pytorch_model.safetensors"))
    print("exported the stepped student to", path)


def main():
    import diffusers
    from diffusers import SanaTransformer2DModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--export-student", metavar="DIR")
    ap.add_argument("--hw", nargs=2, type=int, metavar=("H", "W"),
                    help="latent height and width (default 4 4); with it, a slim fixture "
                         "train_step_tiny_HxW.* without the initial and updated weights and the per-tensor "
                         "gradients (the same seeds give the same initial student and heads as the square "
                         "fixture, which the test reads them from); gradients are checked through their norms")
    args = ap.parse_args()
    global H, W
    slim = args.hw is not None
    if slim:
        H, W = args.hw

    torch.manual_seed(0)  # heads: torch default init and SpectralNorm u/v init use the global generator
    gen = torch.Generator().manual_seed(1234)
    teacher = SanaTransformer2DModel.from_pretrained(TEACHER_DIR, torch_dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    student, logvar_linear = build_student(teacher, gen)
    heads = make_heads(teacher.config.num_attention_heads * teacher.config.attention_head_dim, len(HEAD_BLOCK_IDS))
    power_iterate(heads, INIT_POWER_ITERATIONS)
    batch = make_batch(gen)
    g, d = draws(gen)

    with torch.no_grad():  # the student at init is the teacher: its guidance embedding is exactly zero
        t = sample_t(g["t_normal"], STUDENT_SAMPLER)
        x = batch["x0"] / SIGMA_DATA
        f_s = trigflow(student, x, t, batch["prompt_embeds"], batch["prompt_mask"], g["cfg"] * 0.1)
        f_t = trigflow(teacher, x, t, batch["prompt_embeds"], batch["prompt_mask"])
        diff = (f_s - f_t).abs().max().item()
        print(f"student at init vs teacher: max abs diff {diff:.3g}")
        assert diff < 1e-5, diff

    init_student = {k: v.detach().clone() for k, v in student_params(student, logvar_linear).items()}
    init_heads = {k: v.clone() for k, v in heads.state_dict().items()}
    student_d, logvar_d, heads_d = (copy.deepcopy(m) for m in (student, logvar_linear, heads))

    g_out = phase_g(teacher, student, logvar_linear, heads, batch, g)
    teacher_d = SanaTransformer2DModel.from_pretrained(TEACHER_DIR, torch_dtype=torch.float32).eval()
    teacher_d.requires_grad_(False)  # fresh teacher: no hooks left over from phase G
    d_out = phase_d(teacher_d, student_d, logvar_d, heads_d, batch, d)

    tensors = {}
    tensors.update({"student." + k: v for k, v in init_student.items()})
    tensors.update({"heads." + k: v for k, v in init_heads.items()})
    tensors.update({"batch." + k: v for k, v in batch.items()})
    tensors.update({"g." + k: v for k, v in g.items()})
    tensors.update({"d." + k: v for k, v in d.items()})
    tensors.update({"g.out." + k: v for k, v in g_out.items()})
    tensors.update({"d.out." + k: v for k, v in d_out.items()})
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    name = f"train_step_tiny_{H}x{W}" if slim else "train_step_tiny"
    init_sum = sum(float(v.double().sum()) for k, v in tensors.items() if k.startswith(("student.", "heads.")))
    if slim:
        big = ("student.", "heads.", "g.out.grad.", "d.out.grad.", "g.out.student.", "d.out.heads.")
        tensors = {k: v for k, v in tensors.items() if not k.startswith(big) or k.endswith("grad_norm")}
    path = os.path.join(args.out_dir, name + ".safetensors")
    save_file(tensors, path)

    meta = dict(
        teacher=TEACHER_DIR, sigma_data=SIGMA_DATA,
        student_sampler=dict(mean=STUDENT_SAMPLER[0], std=STUDENT_SAMPLER[1]),
        disc_sampler=dict(mean=DISC_SAMPLER[0], std=DISC_SAMPLER[1]),
        sampler="t = atan(exp(n * std + mean) / 0.5)", cfg_scales=CFG_SCALES,
        guidance_embeds_scale=GUIDANCE_EMBEDS_SCALE, largest_timestep=LARGEST_TIMESTEP,
        largest_timestep_prob=LARGEST_TIMESTEP_PROB, train_largest_timestep=True, misaligned_pairs_D=True,
        global_step=GLOBAL_STEP, tangent_warmup_steps=TANGENT_WARMUP_STEPS,
        tangent_warmup_r=min(1.0, GLOBAL_STEP / TANGENT_WARMUP_STEPS), tangent_norm_c=TANGENT_NORM_C,
        scm_lambda=SCM_LAMBDA, adv_lambda=ADV_LAMBDA, lr=LR, lr_d=LR, betas=list(BETAS), weight_decay=WEIGHT_DECAY,
        eps=EPS, gradient_clip=GRADIENT_CLIP, head_block_ids=HEAD_BLOCK_IDS,
        init_power_iterations=INIT_POWER_ITERATIONS, batch=dict(B=B, C=C, H=H, W=W, L=L),
        student_self_attention="linear (diffusers SanaLinearAttnProcessor2_0)",
        student_cross_attention="math softmax (= SDPA maths)",
        guidance_embedder_init="linear_1.weight ~ N(0, 0.02), linear_1.bias = 0, linear_2 = 0",
        logvar_linear_init="xavier uniform weight, zero bias",
        notes=["float32 throughout; G and D both start from the stored initial student and heads",
               "d.noise is drawn but unused: with train_largest_timestep every D sample is re-noised with "
               "d.noise_largest (docs/ALGORITHM.md §5.7 step 2)",
               "largest_uniform draws are folded so both branches occur (G: sample 0 forced, D: sample 1)",
               "g.out.grad.* / d.out.grad.* are pre-clip; g.out.student.* / d.out.heads.* after one AdamW step",
               "extra outputs: g.out.x_t, g.out.tangent (normalised), g.out.t_prime, g.out.t_d, d.out.t, "
               "d.out.x0_fake, d.out.t_d, d.out.t_shift"],
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__),
        init_weights_sum=init_sum,
        slim=slim,
    )
    with open(os.path.join(args.out_dir, name + ".json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    if args.export_student:
        export_student(args.export_student, teacher,
                       {k[len("g.out.student."):]: v for k, v in tensors.items() if k.startswith("g.out.student.")})

    print(f"wrote {path}: {len(tensors)} tensors, {sum(v.numel() for v in tensors.values())} values, "
          f"{os.path.getsize(path) / 2**20:.2f} MiB")
    for phase, out in (("g", g_out), ("d", d_out)):
        for k, v in out.items():
            if v.dim() == 0:
                print(f"{phase}.out.{k} = {v.item():.9g}")
    print("g.out.logvar =", g_out["logvar"].flatten().tolist())


if __name__ == "__main__":
    main()
