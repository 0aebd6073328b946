"""PyTorch counterpart of benches/gemma2.rs: one real-size Gemma-2-2B decoder layer (D 2304, 8 heads, 4 kv heads,
head_dim 256, MLP 9216; random weights) as a 1-layer transformers Gemma2Model with eager attention, 512 tokens,
batch 1, float32 on the CPU, no grad. The embedding table is cut to 256 rows (negligible, as in the Rust bench).

Versions: torch 2.15.0 (CPU), transformers 5.23.0. Run:
    /work/venv/bin/python tools/golden/bench_gemma2.py
"""
import statistics
import time

import torch
from transformers import Gemma2Config, Gemma2Model

TOKENS, VOCAB, RUNS = 512, 256, 7


def main():
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=1, vocab_size=VOCAB, attn_implementation="eager")
    model = Gemma2Model(cfg).eval().float()
    ids = ((torch.arange(TOKENS) * 37 + 11) % VOCAB).unsqueeze(0)
    mask = torch.ones(1, TOKENS, dtype=torch.long)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # warm-up
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            model(ids, attention_mask=mask).last_hidden_state.max().item()
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    print(
        f"gemma2 layer (PyTorch {torch.__version__}, eager), {TOKENS} tokens, batch 1, f32 CPU, "
        f"{torch.get_num_threads()} threads: median {statistics.median(times):.1f} ms "
        f"(min {times[0]:.1f}, max {times[-1]:.1f}, {RUNS} runs)"
    )


if __name__ == "__main__":
    main()
