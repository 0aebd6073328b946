"""PyTorch reference measurements for the GPU check: the same measurements as `sprint-bench`, made with the
reference stack (diffusers / transformers), random weights built from the real configs, no downloads.

Needs torch, diffusers and transformers only (no accelerate). Tested with torch 2.15, diffusers 0.42.1,
transformers 5.23. Each subcommand prints one result line and appends one JSON line to --out, in the schema of
`sprint-bench` (`impl` "reference"), keyed like its counterpart so that tools/gpu/make_table.py can join them:

    python tools/gpu/reference_bench.py [--device cuda] [--smoke] --out results.jsonl <subcommand>
      dcae --batch 1 --resolution 1024     AutoencoderDC encoder, f32: images/s
      gemma --tokens 300 --batch 8         Gemma2Model, bf16: prompts/s
      encode --batch 4 --resolution 1024   the per-step encoding of train_sana_sprint_diffusers.py (AutoencoderDC f32
                                           encode + SanaPipeline.encode_prompt with the complex human instruction,
                                           Gemma bf16), i.e. what sprint-prep moves out of the training loop: samples/s
      train-step --config 1.6B --batch 1 [--gradient_checkpointing] --steps 6
                                           the training step of train_sana_sprint_diffusers.py with
                                           --mixed_precision bf16 --train_largest_timestep --misaligned_pairs_D:
                                           s per G and D step (encoding timed separately), peak GPU memory, GPU busy %

The training step follows docs/ALGORITHM.md §5.2–§5.8 *as written* (the reference's behaviour, bugs included): student and
teacher cast to bf16 (weights and AdamW state in bf16), forwards under bf16 autocast (what accelerate's
prepare() does), student attention processors swapped to a softmax "vanilla" processor, guidance embedder
zero-initialised, teacher CFG velocity with the unconditional half first, torch.func.jvp through the student,
the sCM loss with tangent warm-up and normalisation, the LADD generator loss through the teacher with forward
hooks and spectral-norm heads, the G backward leaving gradients in the heads, AdamW steps with clipping at 0.1;
D: the largest-timestep branch with 0.5 (as written), hinge loss. One deviation: with --misaligned_pairs_D and a
batch > 1 the script as written crashes (the real call gets the doubled prompts, docs/ALGORITHM.md §5.7 step 5); here the
doubled prompts go to the fake call only. The VAE (f32) and Gemma (bf16) stay on the GPU during training, as in
the script, and every batch is encoded (timed separately, `encode_s`).

--smoke shrinks every size exactly as `sprint-bench --smoke` does, so the whole set runs on a CPU.
GPU busy % samples `nvidia-smi --query-gpu=utilization.gpu` every 100 ms over the timed iterations; peak memory
is the highest `memory.used` seen (device-wide, like sprint-bench), plus torch's own max_memory_allocated/reserved.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
# datasets/tiny-sana-sprint/vae/config.json (smoke runs)
TINY_VAE = dict(
    SANA_VAE,
    attention_head_dim=8, encoder_block_out_channels=[8, 16, 16, 32, 32, 32],
    decoder_block_out_channels=[8, 16, 16, 32, 32, 32], encoder_layers_per_block=[1] * 6,
    decoder_layers_per_block=[1] * 6,
)
GEMMA_VOCAB = 256000
SMOKE_VOCAB = 2048

# diffusers' default complex human instruction (the training script's COMPLEX_HUMAN_INSTRUCTION)
COMPLEX_HUMAN_INSTRUCTION = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
]
# the caption words of sprint-bench (src/synth.rs CAPTION_WORDS)
CAPTION_WORDS = """a an the of with and in on at by under over near behind image photo painting illustration scene
portrait landscape close-up view red orange yellow green teal blue purple pink white black brown golden silver grey
pastel vivid soft warm cold bright dark glowing cat dog bird horse fox owl dragon robot woman man child knight city
street forest mountain river ocean beach desert garden castle house room window table chair flower tree cloud sky sun
moon star light shadow fog rain snow fire water stone glass metal wood small large tall round fluffy ancient modern
futuristic detailed cinematic dramatic peaceful busy quiet colorful minimalist realistic surreal standing sitting
flying sleeping walking reflecting surrounded wearing holding looking style lighting background foreground texture
composition atmosphere depth field lens camera angle wide macro night dusk dawn morning evening autumn winter spring
summer highly sharp focus art digital oil watercolor sketch render octane unreal engine""".split()

SIGMA_DATA = 0.5
HEAD_BLOCK_IDS = [2, 8, 14, 19]


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------- configs

def gemma_config(layers, vocab):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab, hidden_size=2304, intermediate_size=9216, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=256, sliding_window=4096,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )


def tiny_gemma_config(vocab):
    """datasets/tiny-sana-sprint/text_encoder/config.json with the smoke vocabulary."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def teacher_config(name, layers=None):
    heads, full, cross_heads, cross_hd = {"1.6B": (70, 20, 20, 112), "0.6B": (36, 28, 16, 72)}[name]
    d = heads * 32
    return dict(
        in_channels=32, out_channels=32, num_attention_heads=heads, attention_head_dim=32,
        num_layers=min(layers or full, full), num_cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_hd, cross_attention_dim=d, caption_channels=2304, mlp_ratio=2.5,
        dropout=0.0, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False,
        norm_eps=1e-6, interpolation_scale=None, guidance_embeds=False, guidance_embeds_scale=0.1,
        qk_norm="rms_norm_across_heads", timestep_scale=1.0,
    )


# ---------------------------------------------------------------------------------------------------- helpers

class Sampler:
    """nvidia-smi utilization.gpu and memory.used every 100 ms on a thread (nothing when nvidia-smi is absent;
    SPRINT_BENCH_NVIDIA_SMI names another executable, as for sprint-bench)."""

    def __init__(self, device):
        self.samples, self.stop_flag = [], threading.Event()
        self.exe = os.environ.get("SPRINT_BENCH_NVIDIA_SMI", "nvidia-smi")
        self.gpu = device.index if device.type == "cuda" else None
        enabled = device.type == "cuda" or "SPRINT_BENCH_NVIDIA_SMI" in os.environ
        self.thread = threading.Thread(target=self.run, daemon=True) if enabled else None
        if self.thread:
            self.thread.start()

    def read(self):
        cmd = [self.exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        if self.gpu is not None:
            cmd += ["-i", str(self.gpu)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0 or not out.stdout.strip():
            return None
        f = [x.strip() for x in out.stdout.splitlines()[0].split(",")]
        num = lambda i: float(f[i]) if i < len(f) and f[i].replace(".", "", 1).isdigit() else None  # noqa: E731
        return time.perf_counter(), num(0), num(1)

    def run(self):
        while not self.stop_flag.is_set():
            t0 = time.perf_counter()
            s = self.read()
            if s is None and not self.samples:
                return
            if s is not None:
                self.samples.append(s)
            self.stop_flag.wait(max(0.0, 0.1 - (time.perf_counter() - t0)))

    def stop(self):
        self.stop_flag.set()
        if self.thread:
            self.thread.join()
        return self

    def busy(self, start, end):
        v = [u for t, u, _ in self.samples if start <= t <= end and u is not None]
        return sum(v) / len(v) if v else None

    def peak_gib(self):
        v = [m for _, _, m in self.samples if m is not None]
        return max(v) / 1024 if v else None

    def first_gib(self):
        v = [m for _, _, m in self.samples if m is not None]
        return v[0] / 1024 if v else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def device_metrics(metrics, notes, sampler, window, device):
    busy = sampler.busy(*window) if window else None
    metrics["gpu_busy_pct"] = busy if busy is not None else "n/a"
    peak = sampler.peak_gib()
    metrics["peak_mem_gib"] = peak if peak is not None else "n/a"
    if peak is not None:
        metrics["mem_before_gib"] = sampler.first_gib()
        notes.append("memory: nvidia-smi memory.used")
    if device.type == "cuda":
        metrics["torch_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        metrics["torch_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30


def versions():
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda}


def emit(args, bench, key, status, params=None, metrics=None, notes=None, error=None, quiet=False):
    line = {"schema": 1, "impl": "reference", "bench": bench, "key": key, "status": status,
            "device": str(args.device_obj), "card": card_name(args.device_obj), "smoke": args.smoke,
            "unix_time": int(time.time()), "versions": versions(), "params": params or {}, "metrics": metrics or {},
            "notes": notes or []}
    if error is not None:
        line["error"] = error
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    if quiet:
        return
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    log(f"[{status}] {key} on {line['card']} (reference): "
        + ", ".join(f"{k} {fmt(v)}" for k, v in sorted((metrics or {}).items()))
        + (f" ({'; '.join(notes)})" if notes else "") + (f" ERROR {error}" if error else ""))


def timed(fn, iters, device):
    """One warm-up call, then `iters` timed calls each followed by a synchronisation."""
    fn()
    sync(device)
    start, times = time.perf_counter(), []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, (start, time.perf_counter())


def median(v):
    return sorted(v)[len(v) // 2]


def build_on(device, fn, dtype=None):
    """Builds a module with its parameters created (and randomly initialised) directly on `device`, in `dtype`
    (default: float32)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return fn()
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------------- tokenizer

def whitespace_pieces(text):
    return re.findall(r"\w+|[^\w\s]+", text)


def make_tokenizer(vocab):
    """The word-level tokenizer of sprint-bench (same recipe, same ids): Gemma's special tokens, every piece of the
    complex human instruction and of the caption words, fillers up to `vocab`; BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    seen = set(words)
    chi = "\n".join(COMPLEX_HUMAN_INSTRUCTION)
    pieces = whitespace_pieces(chi) + whitespace_pieces(chi.lower())
    pieces += [p for w in CAPTION_WORDS for p in whitespace_pieces(w)] + [",", "."]
    for p in pieces:
        if p not in seen:
            seen.add(p)
            words.append(p)
    i = 0
    while len(words) < vocab:
        w = f"tok{i}"
        i += 1
        if w not in seen:
            seen.add(w)
            words.append(w)
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


def captions(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(CAPTION_WORDS, int(rng.integers(40, 121)))]
        out.append(" ".join(words).capitalize() + ".")
    return out


# ---------------------------------------------------------------------------------------------------- sizes, keys

def dcae_sizes(args):
    return (64, min(args.batch, 2), 2) if args.smoke else (args.resolution, args.batch, args.iters)


def gemma_sizes(args):
    return (1, SMOKE_VOCAB, min(args.tokens, 32), 2) if args.smoke else (26, GEMMA_VOCAB, args.tokens, args.iters)


def train_sizes(args):
    """(resolution, batch, layers, steps, prompt tokens), as sprint-bench resolves them."""
    if args.smoke:
        return 64, min(args.batch, 2), args.layers or 1, min(args.steps, 4), 16
    return args.resolution, args.batch, args.layers, args.steps, 300


def key_of(args):
    """The result key, identical to sprint-bench's for the same measurement."""
    if args.command == "dcae":
        res, batch, _ = dcae_sizes(args)
        return f"dcae f32 {res}px b{batch}"
    if args.command == "gemma":
        return f"gemma2-2b bf16 {gemma_sizes(args)[2]}tok b{args.batch}"
    if args.command == "encode":
        return f"encoding {64 if args.smoke else args.resolution}px"
    res, batch = train_sizes(args)[:2]
    return (f"train-step {args.config} {res}px b{batch} bf16{' ckpt' if args.gradient_checkpointing else ''}"
            f"{' profiled' if args.profile else ''}")


# ---------------------------------------------------------------------------------------------------- dcae / gemma

def bench_dcae(args):
    from diffusers import AutoencoderDC

    res, batch, iters = dcae_sizes(args)
    key = key_of(args)
    dev = args.device_obj
    torch.manual_seed(0)
    encoder = build_on(dev, lambda: AutoencoderDC(**SANA_VAE).encoder).eval()
    x = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
    sampler = Sampler(dev)
    with torch.no_grad():
        times, window = timed(lambda: encoder(x), iters, dev)
    sampler.stop()
    s = median(times)
    metrics, notes = {"images_per_s": batch / s, "s_per_batch": s}, [f"median of {len(times)} runs after 1 warm-up"]
    if dev.type == "cuda":
        notes.append(f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} (torch default)")
    device_metrics(metrics, notes, sampler, window, dev)
    emit(args, "dcae", key, "ok", dict(batch=batch, resolution=res, dtype="f32", iters=len(times),
                                        model="diffusers AutoencoderDC(SANA f32c32).encoder, random init"),
         metrics, notes)


def bench_gemma(args):
    from transformers import Gemma2Model

    layers, vocab, tokens, iters = gemma_sizes(args)
    key = key_of(args)
    dev = args.device_obj
    torch.manual_seed(0)
    model = build_on(dev, lambda: Gemma2Model._from_config(gemma_config(layers, vocab), dtype=torch.bfloat16)).eval()
    ids = torch.randint(5, vocab, (args.batch, tokens), device=dev)
    ids[:, 0] = 2
    mask = torch.ones(args.batch, tokens, dtype=torch.long, device=dev)
    sampler = Sampler(dev)
    with torch.no_grad():
        times, window = timed(lambda: model(ids, attention_mask=mask).last_hidden_state, iters, dev)
    sampler.stop()
    s = median(times)
    metrics = {"prompts_per_s": args.batch / s, "s_per_batch": s}
    notes = [f"median of {len(times)} runs after 1 warm-up",
             f"attn_implementation={model.config._attn_implementation}"]
    device_metrics(metrics, notes, sampler, window, dev)
    emit(args, "gemma", key, "ok", dict(batch=args.batch, tokens=tokens, dtype="bf16", layers=layers, vocab=vocab,
                                         iters=len(times), model="transformers Gemma2Model, random init"),
         metrics, notes)


# ---------------------------------------------------------------------------------------------------- encoding

class Encoders:
    """The script's encoders: AutoencoderDC in f32 and a SanaPipeline holding Gemma2Model in bf16 and the
    tokenizer, used through encode_prompt with the complex human instruction."""

    def __init__(self, dev, vae_cfg, gemma_cfg, vocab):
        from diffusers import AutoencoderDC, SanaPipeline
        from transformers import Gemma2Model

        self.vae = build_on(dev, lambda: AutoencoderDC(**vae_cfg)).eval().requires_grad_(False)
        text_encoder = build_on(dev, lambda: Gemma2Model._from_config(gemma_cfg, dtype=torch.bfloat16))
        text_encoder.eval().requires_grad_(False)
        self.tokenizer = make_tokenizer(vocab)
        self.pipe = SanaPipeline(tokenizer=self.tokenizer, text_encoder=text_encoder, vae=None, transformer=None,
                                 scheduler=None)
        self.dev = dev
        self.prompt_tokens = len(self.tokenizer.encode("\n".join(COMPLEX_HUMAN_INSTRUCTION))) + 300 - 2

    def prompts(self, prompts, max_sequence_length=300, chi=True):
        with torch.no_grad():
            emb, mask, _, _ = self.pipe.encode_prompt(
                prompts, complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION if chi else False,
                do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return emb, mask

    def latents(self, pixels):
        with torch.no_grad():
            return self.vae.encode(pixels).latent


def encoder_sizes(args):
    """(resolution, VAE config, Gemma config, vocabulary) of the encoding runs."""
    if args.smoke:
        return 64, TINY_VAE, tiny_gemma_config(SMOKE_VOCAB), SMOKE_VOCAB
    return args.resolution, SANA_VAE, gemma_config(26, GEMMA_VOCAB), GEMMA_VOCAB


def bench_encode(args):
    res, vae_cfg, gemma_cfg, vocab = encoder_sizes(args)
    iters = 2 if args.smoke else args.iters
    key = key_of(args)
    dev = args.device_obj
    torch.manual_seed(0)
    enc = Encoders(dev, vae_cfg, gemma_cfg, vocab)
    batches = [captions(args.batch, seed) for seed in range(iters + 1)]
    pixels = torch.rand(args.batch, 3, res, res, device=dev) * 2 - 1
    state = {"i": 0}
    split = {"vae": [], "text": []}

    def one():
        t0 = time.perf_counter()
        enc.prompts(batches[state["i"] % len(batches)])
        sync(dev)
        t1 = time.perf_counter()
        enc.latents(pixels)
        sync(dev)
        split["text"].append(t1 - t0)
        split["vae"].append(time.perf_counter() - t1)
        state["i"] += 1

    sampler = Sampler(dev)
    times, window = timed(one, iters, dev)
    sampler.stop()
    s = median(times)
    metrics = {"samples_per_s": args.batch / s, "s_per_batch": s, "vae_s": median(split["vae"][1:]),
               "text_s": median(split["text"][1:])}
    notes = [f"median of {len(times)} batches after 1 warm-up; no image decoding (the script's DataLoader "
             f"workers do that in parallel)", f"prompt tokens {enc.prompt_tokens}"]
    device_metrics(metrics, notes, sampler, window, dev)
    emit(args, "encode", key, "ok", dict(batch=args.batch, resolution=res, vae_dtype="f32", text_dtype="bf16",
                                          prompt_tokens=enc.prompt_tokens,
                                          what="per-step encoding of train_sana_sprint_diffusers.py"),
         metrics, notes)


# ---------------------------------------------------------------------------------------------------- training step

class VanillaAttnProcessor:
    """The script's SanaVanillaAttnProcessor (docs/ALGORITHM.md §5.2): softmax attention written with explicit matmuls, so that
    torch.func.jvp can differentiate it; set on every attention module of the student."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        split = lambda t: t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(key), split(value)
        bias = torch.zeros(query.shape[0], query.shape[1], query.shape[2], key.shape[2], dtype=query.dtype,
                           device=query.device)
        if attention_mask is not None:
            bias = bias + attention_mask
        weights = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(head_dim) + bias, dim=-1)
        out = (weights @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class TrigFlow(nn.Module):
    """SanaTrigFlow (docs/ALGORITHM.md §5.3): TrigFlow time t -> flow time, input scaling, backbone, output transform; the
    student variant adds logvar_linear on the time embedding of t. Forwards run under bf16 autocast."""

    def __init__(self, model, guidance, autocast):
        super().__init__()
        self.model, self.guidance, self.autocast = model, guidance, autocast
        if guidance:
            d = model.config.num_attention_heads * model.config.attention_head_dim
            self.logvar_linear = nn.Linear(d, 1, device=model.device)
            nn.init.xavier_uniform_(self.logvar_linear.weight)
            nn.init.constant_(self.logvar_linear.bias, 0)

    def forward(self, x, y, t, mask, guidance=None, jvp=False, return_logvar=False):
        with self.autocast():
            b = x.shape[0]
            t = t.expand(b).to(y.dtype)  # rounded to the prompt dtype, as written
            tau = torch.sin(t) / (torch.cos(t) + torch.sin(t))
            tt = tau.view(-1, 1, 1, 1)
            rho = torch.sqrt(tt ** 2 + (1 - tt) ** 2)
            x_in = (x * rho).to(y.dtype)
            checkpointing = self.model.gradient_checkpointing
            if jvp and checkpointing:
                self.model.gradient_checkpointing = False
            v = self.model(hidden_states=x_in, encoder_hidden_states=y, timestep=tau, guidance=guidance,
                           encoder_attention_mask=mask)[0]
            self.model.gradient_checkpointing = checkpointing
            out = ((1 - 2 * tt) * x_in + (1 - 2 * tt + 2 * tt ** 2) * v) / rho
            if self.guidance and guidance is not None:
                _, emb = self.model.time_embed(t, guidance=guidance, hidden_dtype=x.dtype)
            else:
                _, emb = self.model.time_embed(t, batch_size=b, hidden_dtype=x.dtype)
            if return_logvar:
                return out, self.logvar_linear(emb)
            return (out,)


def disc_heads(channels, n, device):
    """SanaMSCMDiscriminator's DiscHeads (docs/ALGORITHM.md §5.8): spectral-norm conv1d blocks with BatchNormLocal."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    def sconv(cin, cout, k, circular):
        conv = nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular" if circular else "zeros")
        SpectralNorm.apply(conv, name="weight", n_power_iterations=1, dim=0, eps=1e-12)
        return conv

    class BatchNormLocal(nn.Module):
        def __init__(self, c, virtual_bs=8, eps=1e-5):
            super().__init__()
            self.virtual_bs, self.eps = virtual_bs, eps
            self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

        def forward(self, x):
            shape = x.shape
            g = math.ceil(x.shape[0] / self.virtual_bs)
            x = x.view(g, -1, x.shape[-2], x.shape[-1])
            mean = x.mean([1, 3], keepdim=True)
            var = x.var([1, 3], keepdim=True, unbiased=False)
            x = (x - mean) / torch.sqrt(var + self.eps)
            return (x * self.weight[None, :, None] + self.bias[None, :, None]).view(shape)

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return (self.fn(x) + x) / math.sqrt(2)

    def block(c, k):
        return nn.Sequential(sconv(c, c, k, True), BatchNormLocal(c), nn.LeakyReLU(0.2, True))

    class Head(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.main = nn.Sequential(block(c, 1), Residual(block(c, 9)))
            self.cls = sconv(c, 1, 1, False)

        def forward(self, x):
            return self.cls(self.main(x))

    return build_on(device, lambda: nn.ModuleList([Head(channels) for _ in range(n)]))


class Discriminator:
    """The frozen teacher wrapper with forward hooks on the head blocks, one head per hooked block."""

    def __init__(self, teacher, heads, block_ids):
        self.teacher, self.heads, self.block_ids = teacher, heads, block_ids

    def __call__(self, x, t, y, mask):
        feats = []
        hooks = [blk.register_forward_hook(lambda m, i, o: feats.append(o))
                 for i, blk in enumerate(self.teacher.model.transformer_blocks) if i in self.block_ids]
        self.teacher(x, y, t, mask)
        for h in hooks:
            h.remove()
        with self.teacher.autocast():
            out = [head(f.transpose(1, 2)).reshape(f.shape[0], -1) for f, head in zip(feats, self.heads)]
        return torch.cat(out, dim=1)


class StageTimer:
    """--profile: per-stage seconds of a step, each stage ended by a device synchronisation (as sprint-bench's
    `--profile`), so a stage's time is its device work plus the host time around it."""

    def __init__(self, device, enabled):
        self.device, self.enabled, self.stages, self.last = device, enabled, {}, None

    def start(self):
        if self.enabled:
            sync(self.device)
            self.stages, self.last = {}, time.perf_counter()

    def mark(self, name):
        if self.enabled and self.last is not None:
            sync(self.device)
            now = time.perf_counter()
            self.stages[name] = self.stages.get(name, 0.0) + now - self.last
            self.last = now

    def finish(self):
        stages, self.last = self.stages, None
        return stages


def sample_t(b, mean, std):
    """compute_density_for_timestep_sampling_scm (CPU randn, 0.5 literal)."""
    return torch.atan(torch.exp(torch.randn(b) * std + mean) / 0.5)


def bench_train_step(args):
    from diffusers import SanaTransformer2DModel

    smoke = args.smoke
    res, batch, layers, steps, seq_len = train_sizes(args)
    key = key_of(args)
    dev = args.device_obj
    started = time.perf_counter()
    deadline = started + args.time_limit if args.time_limit else None
    torch.manual_seed(0)
    np.random.seed(0)
    wd = torch.bfloat16
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)  # noqa: E731

    # encoders stay on the device for the whole run, as in the script
    vae_cfg = TINY_VAE if smoke else SANA_VAE
    gemma_cfg = gemma_config(1, SMOKE_VOCAB) if smoke else gemma_config(26, GEMMA_VOCAB)
    enc = Encoders(dev, vae_cfg, gemma_cfg, SMOKE_VOCAB if smoke else GEMMA_VOCAB)
    sf = vae_cfg["scaling_factor"]

    cfg = teacher_config(args.config, layers)
    n_layers = cfg["num_layers"]
    block_ids = sorted({min(i, n_layers - 1) for i in HEAD_BLOCK_IDS})
    # built in bf16 on the device: the script casts on the CPU, so the GPU never holds float32 copies
    teacher_model = build_on(dev, lambda: SanaTransformer2DModel(**cfg), wd)
    student_model = build_on(dev, lambda: SanaTransformer2DModel(**dict(cfg, guidance_embeds=True)), wd)
    student_model.set_attn_processor(VanillaAttnProcessor())
    sd = {k.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder."): v
          for k, v in teacher_model.state_dict().items()}
    student_model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        for p in student_model.time_embed.guidance_embedder.parameters():
            p.zero_()
    transformer = TrigFlow(student_model, guidance=True, autocast=autocast).train()
    pretrained = TrigFlow(teacher_model, guidance=False, autocast=autocast).eval()
    heads = disc_heads(cfg["num_attention_heads"] * cfg["attention_head_dim"], len(block_ids), dev).to(wd)
    disc = Discriminator(pretrained, heads, block_ids)
    transformer.requires_grad_(True)
    pretrained.requires_grad_(False)
    heads.requires_grad_(True)
    transformer.to(dev, dtype=wd)
    pretrained.to(dev, dtype=wd)
    heads.to(dev, dtype=wd)
    if args.gradient_checkpointing:
        student_model.enable_gradient_checkpointing()
    opt_g = torch.optim.AdamW(transformer.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    opt_d = torch.optim.AdamW(heads.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    neg_embeds, neg_mask = enc.prompts([""] * batch, max_sequence_length=seq_len, chi=False)
    setup_s = time.perf_counter() - started
    if dev.type == "cuda":  # the measured peak is the training's, not the set-up's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    log(f"reference models ready in {setup_s:.1f} s ({n_layers} blocks, heads on {block_ids})")

    prof = StageTimer(dev, args.profile)
    sd_ = SIGMA_DATA
    scm_cfg_scale, logit = [4.0, 4.5, 5.0], (0.2, 1.6)
    logit_d = (-0.6, 1.0)
    largest_t, largest_p = 1.5708, 0.5
    cos, sin = torch.cos, torch.sin

    def g_step(x0, emb, mask, global_step):
        transformer.train()
        noise = torch.randn_like(x0) * sd_
        t = sample_t(batch, *logit).to(dev).view(-1, 1, 1, 1)
        x_t = cos(t) * x0 + sin(t) * noise
        w = torch.tensor(np.random.choice(scm_cfg_scale, size=batch, replace=True), device=dev)
        guidance = w.flatten() * 0.1
        heads.eval()
        with torch.no_grad():
            f_all = pretrained(torch.cat([x_t, x_t]) / sd_, torch.cat([neg_embeds, emb]), torch.cat([t, t]).flatten(),
                               torch.cat([neg_mask, mask]))[0]
            uncond, cond = (sd_ * f_all).chunk(2)
            dxt_dt = uncond + w.view(-1, 1, 1, 1) * (cond - uncond)
        prof.mark("teacher_cfg")
        v_x = cos(t) * sin(t) * dxt_dt / sd_
        v_t = cos(t) * sin(t)

        def wrapper(xh, tt):
            return transformer(xh, emb, tt.flatten(), mask, guidance=guidance, jvp=True, return_logvar=True)

        with torch.no_grad():
            _, dF, _ = torch.func.jvp(wrapper, (x_t / sd_, t), (v_x, v_t), has_aux=True)
        prof.mark("jvp")
        F_s, logvar = transformer(x_t / sd_, emb, t.flatten(), mask, guidance=guidance, return_logvar=True)
        prof.mark("student_forward")
        logvar = logvar.view(-1, 1, 1, 1)
        dF, F_minus = dF.detach(), F_s.detach()
        r = min(1, global_step / 4000)
        g = -cos(t) * cos(t) * (sd_ * F_minus - dxt_dt) - r * (cos(t) * sin(t) * x_t + sd_ * dF)
        g = g / (torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True) + 0.1)
        weight = 1 / (torch.tan(t) * sd_)
        scm = ((weight / torch.exp(logvar)) * torch.square(F_s - F_minus - g) + logvar).mean()
        prof.mark("scm_loss")
        # --train_largest_timestep: a fresh student pass at t' (largest_timestep with probability 0.5)
        t_new = sample_t(batch, *logit).to(dev).view(-1, 1, 1, 1)
        t_new = torch.where(torch.rand_like(t_new) < largest_p, torch.full_like(t_new, largest_t), t_new)
        x_new = cos(t_new) * x0 + sin(t_new) * (torch.randn_like(x0) * sd_)
        F_new = transformer(x_new / sd_, emb, t_new.flatten(), mask, guidance=guidance)[0]
        x0_pred = cos(t_new) * x_new - sin(t_new) * F_new * sd_
        prof.mark("student_forward")
        t_d = sample_t(batch, *logit_d).to(dev).view(-1, 1, 1, 1)
        x_d = cos(t_d) * x0_pred + sin(t_d) * (torch.randn_like(x0) * sd_)
        adv = -torch.mean(disc(x_d / sd_, t_d.flatten(), emb, mask))
        prof.mark("ladd_forward")
        (scm + 0.5 * adv).backward()
        prof.mark("backward")
        norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), 0.1)
        finite = torch.isfinite(norm)
        prof.mark("clip")
        if finite:
            opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        prof.mark("optimizer")
        out = scm.item(), adv.item()
        prof.mark("loss_readback")
        return out

    def d_step(x0, emb, mask):
        transformer.eval()
        heads.train()
        with torch.no_grad():
            w = torch.tensor(np.random.choice(scm_cfg_scale, size=batch, replace=True), device=dev)
            t = sample_t(batch, *logit).to(dev).view(-1, 1, 1, 1)
            t = torch.where(torch.rand_like(t) < largest_p, torch.full_like(t, largest_p), t)  # 0.5, as written
            x_t = cos(t) * x0 + sin(t) * (torch.randn_like(x0) * sd_)
            F_s = transformer(x_t / sd_, emb, t.flatten(), mask, guidance=w.flatten() * 0.1)[0]
            x0_fake = cos(t) * x_t - sin(t) * F_s * sd_
        prof.mark("student_forward")
        t_d = sample_t(batch, *logit_d).to(dev).view(-1, 1, 1, 1)
        fake = cos(t_d) * x0_fake + sin(t_d) * (torch.randn_like(x0) * sd_)
        real = cos(t_d) * x0 + sin(t_d) * (torch.randn_like(x0) * sd_)
        fake_t, fake_emb, fake_mask = t_d, emb, mask
        if batch > 1:  # --misaligned_pairs_D, with the doubled prompts for the fake call only (see the notes)
            t_s = sample_t(batch, *logit_d).to(dev).view(-1, 1, 1, 1)
            shifted = cos(t_s) * torch.roll(x0, 1, 0) + sin(t_s) * (torch.randn_like(x0) * sd_)
            fake, fake_t = torch.cat([fake, shifted]), torch.cat([t_d, t_s])
            fake_emb, fake_mask = torch.cat([emb, emb]), torch.cat([mask, mask])
        pred_fake = disc(fake / sd_, fake_t.flatten(), fake_emb, fake_mask)
        pred_real = disc(real / sd_, t_d.flatten(), emb, mask)
        loss = 0.5 * (torch.mean(F.relu(1.0 - pred_real)) + torch.mean(F.relu(1.0 + pred_fake)))
        prof.mark("d_forward")
        loss.backward()
        prof.mark("backward")
        norm = torch.nn.utils.clip_grad_norm_(heads.parameters(), 0.1)
        finite = torch.isfinite(norm)
        prof.mark("clip")
        if finite:
            opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        prof.mark("optimizer")
        out = loss.item()
        prof.mark("loss_readback")
        return out

    pixels = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
    sampler = Sampler(dev)
    log_rows, enc_times, losses, step_stages = [], [], {}, []
    for step in range(steps):
        if deadline and time.perf_counter() > deadline:
            break
        phase = "G" if step % 2 == 0 else "D"
        sync(dev)
        t0 = time.perf_counter()
        emb, mask = enc.prompts(captions(batch, step), max_sequence_length=seq_len)
        x0 = (enc.latents(pixels) * sf * sd_).to(wd)
        sync(dev)
        t1 = time.perf_counter()
        prof.start()
        if phase == "G":
            losses["last_scm_loss"], losses["last_adv_loss"] = g_step(x0, emb, mask, step)
        else:
            losses["last_d_loss"] = d_step(x0, emb, mask)
        sync(dev)
        log_rows.append((phase, t1, time.perf_counter()))
        step_stages.append((phase, prof.finish()))
        enc_times.append(t1 - t0)
    sampler.stop()
    timed_rows = log_rows[2:] if len(log_rows) >= 4 else log_rows[1:]
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    g = [b - a for p, a, b in timed_rows if p == "G"]
    d = [b - a for p, a, b in timed_rows if p == "D"]
    enc_s = mean(enc_times[2:] if len(enc_times) >= 4 else enc_times[1:])
    na = lambda v: v if v is not None else "n/a"  # noqa: E731
    metrics = {"g_step_s": na(mean(g)), "d_step_s": na(mean(d)), "g_steps_timed": len(g), "d_steps_timed": len(d),
               "encode_s": na(enc_s), **losses}
    if mean(g) is not None and enc_s is not None:
        metrics["g_step_plus_encode_s"] = mean(g) + enc_s
    if mean(d) is not None and enc_s is not None:
        metrics["d_step_plus_encode_s"] = mean(d) + enc_s
    timed_stages = step_stages[2:] if len(step_stages) >= 4 else step_stages[1:]
    for phase in ("G", "D"):
        names = []
        for p, st in timed_stages:
            names += [n for n in st if p == phase and n not in names]
        for n in names:
            v = [st[n] for p, st in timed_stages if p == phase and n in st]
            metrics[f"{phase.lower()}_stage_{n}_s"] = mean(v)
    if args.profile and enc_s is not None:
        metrics["g_stage_encode_s"] = enc_s
    notes = ["first G and D steps are warm-up (not timed); step times exclude the per-batch encoding (encode_s)"]
    if len(log_rows) < steps:
        notes.append(f"stopped by --time_limit after {len(log_rows)} of {steps} steps")
    window = (timed_rows[0][1], timed_rows[-1][2]) if timed_rows else None
    device_metrics(metrics, notes, sampler, window, dev)
    status = "ok" if len(log_rows) == steps else ("partial" if timed_rows else "timeout")
    emit(args, "train-step", key, status,
         dict(config=args.config, layers=n_layers, resolution=res, batch=batch,
              gradient_checkpointing=args.gradient_checkpointing, mixed_precision="bf16", steps=steps,
              prompt_tokens=seq_len, train_largest_timestep=True, misaligned_pairs_D=True, head_block_ids=block_ids,
              profile=args.profile,
              setup_s=setup_s, what="train_sana_sprint_diffusers.py step as written (docs/ALGORITHM.md §5.5–§5.8)"),
         metrics, notes)


# ---------------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, as sprint-bench --smoke")
    ap.add_argument("--out", help="append one JSON line per result")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dcae")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--iters", type=int, default=5)
    p = sub.add_parser("gemma")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p = sub.add_parser("encode")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--iters", type=int, default=3)
    p = sub.add_parser("train-step")
    p.add_argument("--config", default="1.6B", choices=["1.6B", "0.6B"])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", default="bf16", choices=["bf16"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int)
    p.add_argument("--time_limit", type=float, help="start no step after this many seconds; report those done")
    p.add_argument("--profile", action="store_true",
                   help="per-stage seconds of the timed steps (g_stage_*, d_stage_*), each stage ended by a sync")
    args = ap.parse_args()
    args.device_obj = torch.device(args.device)
    if args.device_obj.type == "cuda" and args.device_obj.index is None:
        args.device_obj = torch.device("cuda", torch.cuda.current_device())
    run = {"dcae": bench_dcae, "gemma": bench_gemma, "encode": bench_encode, "train-step": bench_train_step}
    # a line never followed by a result means the process was killed (time limit, crash)
    emit(args, args.command, key_of(args), "started", quiet=True)
    try:
        run[args.command](args)
    except Exception as e:  # noqa: BLE001  (one result line whatever happens, e.g. out of memory)
        import traceback

        traceback.print_exc()
        emit(args, args.command, key_of(args), "error", error=f"{type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
