"""Golden fixture for few-step SCM sampling (docs/ALGORITHM.md §7; diffusers `SanaSprintPipeline.__call__`, `SCMScheduler.step`): tests/fixtures/sampler_tiny.{safetensors,json}.

Runs the REAL diffusers `SanaSprintPipeline.__call__` (+ `SCMScheduler`) on the tiny pipeline
datasets/tiny-sana-sprint/ (its tokenizer, text encoder, DC-AE and scheduler) with a student-shaped transformer:

* student = `SanaTransformer2DModel(**teacher_config, guidance_embeds=True, num_layers=STUDENT_LAYERS)`; every
  tensor copied from the tiny teacher (its first STUDENT_LAYERS blocks, so the fixture stays small), with the
  timestep-embedder remap of the training script (student `time_embed.timestep_embedder.*` <- teacher
  `time_embed.emb.timestep_embedder.*`); the guidance embedder gets small random NON-zero weights so that the
  guidance input changes the output; a random `logvar_linear` (unused by sampling, needed to load a student).
* prompts are encoded once with the pipeline's own `encode_prompt` (complex human instruction, text encoder in
  f32) and passed as `prompt_embeds` / `prompt_attention_mask`, so the text encoder is out of the loop.
* the initial noise goes in through `latents=` — the pipeline multiplies given latents by sigma_data exactly as
  drawn ones (`prepare_latents` returns them unchanged, then `latents = latents * sigma_data`), so the stored
  `init_noise` is the unit-normal draw of docs/ALGORITHM.md §7 step 4;
* the scheduler's per-step draw (`randn_tensor` in diffusers.schedulers.scheduling_scm, one per step, also on
  the last step where it is multiplied by sin 0 = 0) is monkeypatched to return the stored unit normals
  `step_noise.{i}` (the scheduler multiplies them by sigma_data).

Stored per case (prefix `io.<case>.`): init_noise (B,32,h,w), step_noise.<i> (B,32,h,w), latent = the pipeline's
`output_type="latent"` result (denoised / sigma_data), image = the `output_type="pil"` result as uint8 NHWC. Common inputs: io.prompt_embeds (B,L,64), io.prompt_mask (B,L) float 0/1.
Weights: `student.<key>` (diffusers keys + logvar_linear.*). Cases: 1 step (intermediate None), 2 steps with the
defaults [1.5708, 1.3, 0], 4 steps linspace(1.5708, 0, 5).

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1, transformers 5.23.0, safetensors. Seeded; rerunning gives
the same files. Run from the repository root:
    /work/venv/bin/python tools/golden/make_golden_sampler.py
"""
import inspect
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
import diffusers.schedulers.scheduling_scm as scheduling_scm
from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
from transformers import AutoTokenizer, Gemma2Model

torch.set_grad_enabled(False)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PIPE = os.path.join(ROOT, "datasets", "tiny-sana-sprint")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
NAME = "sampler_tiny"

STUDENT_LAYERS = 2
PROMPTS = ["A small red fox sitting in a snowy forest at dawn.", "an old lighthouse on a rocky coast"]
MAX_SEQUENCE_LENGTH = 40
HEIGHT, WIDTH = 64, 96  # latent 2x3 with the f32 DC-AE
GUIDANCE_SCALE = 4.5
CASES = [
    # name, num_inference_steps, intermediate_timesteps
    ("one_step", 1, None),
    ("two_steps", 2, 1.3),
    ("four_steps", 4, None),
]


def build_student():
    config = SanaTransformer2DModel.load_config(os.path.join(PIPE, "transformer"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(guidance_embeds=True, num_layers=STUDENT_LAYERS)
    student = SanaTransformer2DModel(**config).eval()
    teacher = load_file(os.path.join(PIPE, "transformer", "diffusion_pytorch_model.safetensors"))
    state = {}
    for key, value in teacher.items():
        if key.startswith("transformer_blocks.") and int(key.split(".")[1]) >= STUDENT_LAYERS:
            continue
        state[key.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder.")] = value
    gen = torch.Generator().manual_seed(1234)
    for key, param in student.state_dict().items():
        if key.startswith("time_embed.guidance_embedder."):
            state[key] = 0.2 * torch.randn(param.shape, generator=gen)
    student.load_state_dict(state, strict=True)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    logvar = {
        "logvar_linear.weight": 0.1 * torch.randn(1, dim, generator=gen),
        "logvar_linear.bias": 0.1 * torch.randn(1, generator=gen),
    }
    return student, config, logvar


def main():
    student, student_config, logvar = build_student()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(PIPE, "tokenizer"))
    text_encoder = Gemma2Model.from_pretrained(os.path.join(PIPE, "text_encoder"), torch_dtype=torch.float32).eval()
    vae = AutoencoderDC.from_pretrained(os.path.join(PIPE, "vae"), torch_dtype=torch.float32).eval()
    scheduler = SCMScheduler.from_pretrained(os.path.join(PIPE, "scheduler"))
    pipe = SanaSprintPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=student, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)

    prompt_embeds, prompt_mask = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                                    complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION)
    b = len(PROMPTS)
    channels = student_config["in_channels"]
    compression = 2 ** (len(vae.config.decoder_block_out_channels) - 1)
    h, w = HEIGHT // compression, WIDTH // compression
    sigma_data = scheduler.config.sigma_data

    io = {"prompt_embeds": prompt_embeds.float(), "prompt_mask": prompt_mask.float()}
    gen = torch.Generator().manual_seed(42)
    cases = []
    original_randn = scheduling_scm.randn_tensor
    for name, steps, intermediate in CASES:
        init_noise = torch.randn(b, channels, h, w, generator=gen)
        step_noise = [torch.randn(b, channels, h, w, generator=gen) for _ in range(steps)]
        outputs = {}
        for output_type in ("latent", "pil"):
            queue = list(step_noise)

            def injected_randn(shape, **kwargs):
                noise = queue.pop(0)
                assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
                return noise.clone()

            scheduling_scm.randn_tensor = injected_randn
            try:
                result = pipe(
                    prompt_embeds=prompt_embeds,
                    prompt_attention_mask=prompt_mask,
                    num_inference_steps=steps,
                    intermediate_timesteps=intermediate,
                    guidance_scale=GUIDANCE_SCALE,
                    height=HEIGHT,
                    width=WIDTH,
                    latents=init_noise.clone(),
                    output_type=output_type,
                    use_resolution_binning=False,  # the tiny transformer's sample_size has no aspect-ratio bins
                    max_sequence_length=MAX_SEQUENCE_LENGTH,
                ).images
            finally:
                scheduling_scm.randn_tensor = original_randn
            assert not queue, "every injected step noise is consumed"
            outputs[output_type] = result
        latent = outputs["latent"].float()
        image = np.stack([np.array(im) for im in outputs["pil"]])  # (B, H, W, 3) uint8
        assert image.shape == (b, HEIGHT, WIDTH, 3) and image.dtype == np.uint8
        io[f"{name}.init_noise"] = init_noise
        for i, noise in enumerate(step_noise):
            io[f"{name}.step_noise.{i}"] = noise
        io[f"{name}.latent"] = latent
        io[f"{name}.image"] = torch.from_numpy(image)
        timesteps = scheduler.timesteps.tolist()  # left by the pipeline's set_timesteps call
        cases.append({"name": name, "num_inference_steps": steps, "intermediate_timesteps": intermediate,
                      "timesteps": timesteps})
        print(name, "timesteps", timesteps, "latent std", float(latent.std()),
              "image mean", float(image.mean()), "image min/max", int(image.min()), int(image.max()))

    # the guidance input must matter: same noise, guidance 0 instead of 4.5
    probe = pipe(prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_mask, num_inference_steps=1,
                 intermediate_timesteps=None, guidance_scale=0.0, height=HEIGHT, width=WIDTH,
                 latents=io["one_step.init_noise"].clone(), output_type="latent",
                 use_resolution_binning=False, max_sequence_length=MAX_SEQUENCE_LENGTH).images
    guidance_effect = float((probe - io["one_step.latent"]).abs().max())
    print("max |latent(g=0) - latent(g=4.5)|", guidance_effect)
    assert guidance_effect > 1e-2

    tensors = {f"student.{k}": v.contiguous().clone() for k, v in student.state_dict().items()}
    tensors.update({f"student.{k}": v.contiguous() for k, v in logvar.items()})
    tensors.update({f"io.{k}": v.contiguous() for k, v in io.items()})
    save_file(tensors, os.path.join(FIXTURES, NAME + ".safetensors"))
    meta = {
        "config": {k: v for k, v in student.config.items() if not k.startswith("_")},
        "prompts": PROMPTS,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "height": HEIGHT,
        "width": WIDTH,
        "guidance_scale": GUIDANCE_SCALE,
        "sigma_data": sigma_data,
        "vae_scaling_factor": vae.config.scaling_factor,
        "max_timesteps": 1.57080,
        "cases": cases,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    with open(os.path.join(FIXTURES, NAME + ".json"), "w") as f:
        json.dump(meta, f, indent=2)
    print("wrote", NAME, sum(t.numel() for t in tensors.values()), "values")


# diffusers' default complex human instruction (SanaSprintPipeline.__call__), docs/ALGORITHM.md §4.1–§4.2
COMPLEX_HUMAN_INSTRUCTION = inspect.signature(SanaSprintPipeline.__call__).parameters[
    "complex_human_instruction"
].default

if __name__ == "__main__":
    main()
