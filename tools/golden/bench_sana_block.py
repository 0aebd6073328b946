"""PyTorch counterpart of benches/sana_block.rs: one real-width SANA-Sprint 1.6B transformer block on the CPU.

D 2240, self-attention 70x32 (SanaLinearAttnProcessor2_0), cross attention 20x112 over 300 caption tokens (120
valid), GLUMBConv FFN 5600 on a 32x32 grid (1024 tokens), batch 1, float32, random (default-init) weights.
Times: the FFN's widest matmul alone (the matmul library's rate), forward (no grad, default processors),
forward + JVP (torch.func.jvp along the tokens and tmod; the cross-attention uses explicit matmul/softmax as the
training script does, SDPA has no forward-mode rule), forward + backward (parameter gradients). Prints figures only.

Pinned versions: torch 2.15.0, diffusers 0.42.1 (the /work/venv reference environment).
Run: /work/venv/bin/python tools/golden/bench_sana_block.py [ITERS] [THREADS]
Peak memory: tools/golden/bench_sana_block.py --peak {forward,jvp,backward} runs that one pass once in this
process and prints the peak resident memory above the set-up (ru_maxrss), like the Rust bench's figures.
(THREADS defaults to torch's default; use the thread count the Rust bench prints for a like-for-like figure.)
"""
import math
import statistics
import sys
import time

import torch
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

GRID, CAPTION_TOKENS, VALID_CAPTION_TOKENS = 32, 300, 120


class ExplicitSoftmaxAttn:
    """Cross attention with explicit matmul + softmax (forward-mode AD friendly); the same math as SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b = hidden_states.shape[0]
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        q, k = attn.norm_q(q), attn.norm_k(k)
        hd = k.shape[-1] // attn.heads
        q, k, v = [t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (q, k, v)]
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if attention_mask is not None:
            s = s + attention_mask.view(b, 1, 1, -1)
        o = torch.softmax(s, dim=-1) @ v
        return attn.to_out[0](o.transpose(1, 2).reshape(b, -1, attn.heads * hd))


def bench(label, iters, fn):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(f"{label:<28} median {med:8.3f} s  (min {min(times):.3f} s, {iters} runs)")
    return med


def main():
    peak = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--peak" else None
    if peak:
        sys.argv = sys.argv[:1]
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    torch.manual_seed(0)
    dim = 2240
    block = SanaTransformerBlock(dim, 70, 32, num_cross_attention_heads=20, cross_attention_head_dim=112,
                                 cross_attention_dim=dim, attention_bias=False, mlp_ratio=2.5,
                                 qk_norm="rms_norm_across_heads").eval()
    params = sum(p.numel() for p in block.parameters())
    x = torch.randn(1, GRID * GRID, dim)
    y = torch.randn(1, CAPTION_TOKENS, dim)
    bias = torch.zeros(1, 1, CAPTION_TOKENS)
    bias[..., VALID_CAPTION_TOKENS:] = -10000.0
    tmod = 0.1 * torch.randn(1, 6 * dim)
    x_dot, tmod_dot = torch.randn_like(x), 0.1 * torch.randn_like(tmod)
    print(f"SANA 1.6B block: D {dim}, {params} parameters, {GRID * GRID} tokens, {CAPTION_TOKENS} caption tokens, "
          f"f32, {torch.get_num_threads()} threads (torch {torch.__version__})")

    def run(xx, tt):
        return block(xx, None, y, bias, tt, GRID, GRID)

    if peak:
        import resource

        block.attn2.set_processor(ExplicitSoftmaxAttn())
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak == "forward":
            with torch.no_grad():
                run(x, tmod)
        elif peak == "jvp":
            with torch.no_grad():
                torch.func.jvp(run, (x, tmod), (x_dot, tmod_dot))
        else:
            run(x, tmod).square().sum().backward()
        top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak {peak}: +{(top - base) / 1024:.0f} MiB above set-up ({base / 1024:.0f} MiB)")
        return

    with torch.no_grad():
        # the matmul library alone: the FFN's widest product, as a Linear computes it (x @ W^T)
        a, w = torch.randn(GRID * GRID, dim), torch.randn(5600, dim)
        t = bench("matmul 1024x2240 * 2240x5600", 3 * iters, lambda: torch.nn.functional.linear(a, w))
        print(f"{'':<28} {2 * GRID * GRID * dim * 5600 / t / 1e9:.0f} GFLOP/s")
        fwd = bench("forward", iters, lambda: run(x, tmod))
        block.attn2.set_processor(ExplicitSoftmaxAttn())
        bench("forward (explicit softmax)", iters, lambda: run(x, tmod))
        jvp = bench("forward + JVP", iters, lambda: torch.func.jvp(run, (x, tmod), (x_dot, tmod_dot)))

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        run(x, tmod).square().sum().backward()

    bwd = bench("forward + backward", iters, fwd_bwd)
    print(f"ratios: JVP/forward {jvp / fwd:.2f}, backward/forward {bwd / fwd:.2f}")


if __name__ == "__main__":
    main()
