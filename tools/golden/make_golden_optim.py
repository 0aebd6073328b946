"""Golden fixture for the optimiser side of the trainer (tests/golden_optim.rs): torch AdamW, clip_grad_norm_ and
the diffusers learning-rate schedules.

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1, safetensors (any). Run from the repository root:
    /work/venv/bin/python tools/golden/make_golden_optim.py tests/fixtures
Writes optim_tiny.safetensors and optim_tiny.json (a few KB).

AdamW (float32, CPU, single-tensor path): three parameters `w` (4, 3), `b` (3,), `scale` (2, 2, 2) with seeded
initial values, torch.optim.AdamW(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2), 3 steps. Before each
step the given gradients are set (`scale` gets none in step 2, so it is skipped entirely there: no decay, its own step
count stays behind), then torch.nn.utils.clip_grad_norm_(params with a grad, 0.1). Gradient scales are chosen so
that steps 1 and 3 clip and step 2 does not. Stored:
    io.init.{p}                       initial parameters
    io.step{k}.grad.{p}               gradients given before step k (k = 1..3; absent where None)
    io.step{k}.norm                   pre-clip total norm returned by clip_grad_norm_ (shape (1,))
    io.step{k}.param.{p}, io.step{k}.exp_avg.{p}, io.step{k}.exp_avg_sq.{p}   after step k
Schedules: diffusers.optimization.get_scheduler(name, optimizer, num_warmup_steps 10, num_training_steps 50,
num_cycles 2, power 2) on an SGD optimizer with lr 1e-4; io.sched.{name} (float64, 61 values) is
optimizer.param_groups[0]["lr"] at scheduler steps 0..60 (scheduler.step() between reads).
"""
import json
import os
import sys

import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file

LR, WD, MAX_NORM = 1e-3, 1e-2, 0.1
SCHED_BASE_LR, WARMUP, TOTAL, NUM_CYCLES, POWER, SCHED_STEPS = 1e-4, 10, 50, 2, 2.0, 60
SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
SHAPES = {"w": (4, 3), "b": (3,), "scale": (2, 2, 2)}
GRAD_SCALE = {1: 1.0, 2: 0.01, 3: 0.5}


def main(out_dir):
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}
    io = {f"io.init.{n}": p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    for k in (1, 2, 3):
        opt.zero_grad(set_to_none=True)
        for n, p in params.items():
            if k == 2 and n == "scale":
                continue
            g = torch.randn(p.shape, generator=gen) * GRAD_SCALE[k]
            p.grad = g.clone()
            io[f"io.step{k}.grad.{n}"] = g
        with_grad = [p for p in params.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(with_grad, MAX_NORM)
        io[f"io.step{k}.norm"] = norm.detach().reshape(1).clone()
        opt.step()
        for n, p in params.items():
            st = opt.state[p]
            io[f"io.step{k}.param.{n}"] = p.detach().clone()
            io[f"io.step{k}.exp_avg.{n}"] = st["exp_avg"].clone()
            io[f"io.step{k}.exp_avg_sq.{n}"] = st["exp_avg_sq"].clone()

    for name in SCHEDULES:
        sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=SCHED_BASE_LR)
        sched = get_scheduler(name, sgd, num_warmup_steps=WARMUP, num_training_steps=TOTAL,
                              num_cycles=NUM_CYCLES, power=POWER)
        lrs = []
        for _ in range(SCHED_STEPS + 1):
            lrs.append(sgd.param_groups[0]["lr"])
            sgd.step()
            sched.step()
        io[f"io.sched.{name}"] = torch.tensor(lrs, dtype=torch.float64)

    io = {k: v.contiguous() for k, v in io.items()}
    save_file(io, os.path.join(out_dir, "optim_tiny.safetensors"))
    cfg = {
        "adamw": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": WD, "max_norm": MAX_NORM,
                  "steps": 3, "params": {n: list(s) for n, s in SHAPES.items()}, "no_grad": {"2": ["scale"]}},
        "schedules": {"base_lr": SCHED_BASE_LR, "warmup": WARMUP, "total": TOTAL, "num_cycles": NUM_CYCLES,
                      "power": POWER, "steps": SCHED_STEPS, "names": SCHEDULES},
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
    with open(os.path.join(out_dir, "optim_tiny.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print({f"step{k}": float(io[f"io.step{k}.norm"]) for k in (1, 2, 3)})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
