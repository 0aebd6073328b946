"""Write the tiny random SANA-Sprint pipeline (datasets/tiny-sana-sprint/) and the prompt-encoding fixture.

The folder has the REAL diffusers layout (docs/ALGORITHM.md §2.5) so that the Rust loaders, the demo and the tests exercise the
same code paths as a real checkpoint, at a few MB:

    model_index.json                      SanaSprintPipeline (SanaPipeline.from_pretrained loads it too)
    tokenizer/                            SentencePiece-style BPE (Gemma layout: "▁" normalizer, byte fallback,
                                          <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, <bos> post-processor), ~1000 tokens
    text_encoder/                         Gemma2Model D=64, 2 layers, GQA 4/2, bf16, SHARDED in two files + index json
    vae/                                  AutoencoderDC, 6 stages (f32c32 like the real one), tiny channels, f32
    transformer/                          SanaTransformer2DModel teacher (no guidance embedder), 20 layers, D=32, f32
    scheduler/                            SCMScheduler (trigflow, sigma_data 0.5)

and tests/fixtures/prompt_tiny.{safetensors,json}: the outputs of the real diffusers `SanaPipeline.encode_prompt`
on this pipeline (text encoder in f32) for a few prompts, with and without the complex human instruction, plus
the empty negative prompt.

Pinned versions (the ones the files were generated with): torch 2.15.0 (CPU), diffusers 0.42.1, transformers 5.23.0,
tokenizers 0.23.3, safetensors (any). Everything is seeded; rerunning gives the same files.

Run from the repository root:
    /work/venv/bin/python tools/golden/make_tiny_pipeline.py
"""
import inspect
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

torch.set_grad_enabled(False)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "datasets", "tiny-sana-sprint")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# diffusers' default COMPLEX_HUMAN_INSTRUCTION (single-quote version), docs/ALGORITHM.md §4.1–§4.2
CHI = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
]

# Caption-like English (ASCII only, so that accented letters in the test prompts go through byte fallback).
CAPTIONS = """
A small red fox sitting in a snowy forest at dawn, soft golden light, shallow depth of field.
A bowl of fresh fruit on a wooden kitchen table, apples, pears and grapes, natural window light.
An old lighthouse on a rocky coast during a storm, huge waves crashing, dramatic dark clouds.
A portrait of a young woman with curly hair wearing a yellow raincoat, city lights in the background.
A cozy reading corner with a leather armchair, a tall bookshelf and a warm lamp, evening mood.
A futuristic city skyline at night with neon signs, flying cars and reflections on wet streets.
Two children flying a colorful kite on a green hill under a bright blue summer sky.
A steaming cup of coffee next to an open notebook and a pen on a marble desk, top view.
A majestic mountain landscape with a clear lake, pine trees and snow capped peaks at sunset.
A black and white photograph of an old man playing the violin on a quiet street corner.
A cute puppy with big brown eyes lying on a soft blue blanket, studio lighting.
An astronaut riding a horse on the surface of the moon, the earth rising in the background.
A watercolor painting of a small village by a river with boats and stone bridges.
A close up photo of a hummingbird drinking nectar from a bright pink flower, sharp detail.
A vintage red car parked in front of a diner with a glowing sign, retro style, film grain.
A field of sunflowers under a cloudy sky, a wooden fence and a path leading to a farmhouse.
A medieval castle on a hill surrounded by fog, ravens flying over the towers, dark fantasy art.
A plate of pasta with tomato sauce and basil leaves, restaurant table, warm light, food photography.
A white sailboat on a calm turquoise sea near a sandy beach with palm trees, aerial view.
A robot made of brass and copper reading a book in a library, steampunk illustration.
A snowy street in a small town at night, warm windows, people walking with umbrellas.
A green tea ceremony in a traditional room with paper walls, calm and minimal composition.
A group of friends laughing around a campfire under a sky full of stars, long exposure.
An oil painting of a bouquet of white roses in a glass vase on a dark background.
A tiger walking through tall grass in the jungle, sunlight through the leaves, wildlife photo.
A modern living room with large windows, a grey sofa, green plants and a wooden floor.
A dragon made of clouds flying above a golden desert at sunrise, epic fantasy scene.
A glass of orange juice with ice cubes and a slice of orange, bright and fresh, macro photo.
A busy market street with colorful fruit stands, hanging lanterns and people shopping.
A cat wearing a tiny hat sitting on a stack of old books, whimsical illustration.
A train crossing a stone bridge over a deep valley, autumn trees in red and orange.
A detailed pencil sketch of a hand holding a feather, high contrast, fine lines.
A bright kitchen with white cabinets, copper pots and a bowl of lemons on the counter.
A scuba diver exploring a coral reef with bright fish and sea turtles, underwater photo.
A quiet forest path covered in fallen leaves, misty morning, rays of light between the trees.
A poster of a space rocket launching at night, bold shapes, flat design, three colors.
An elegant dancer in a flowing red dress spinning on a dark stage, motion blur.
A bicycle leaning against a brick wall with ivy, a blue door and flower pots, summer afternoon.
A tall waterfall falling into a green pool surrounded by ferns and mossy rocks.
A bowl of ramen with an egg, noodles, green onions and steam rising, close up.
A snowman with a carrot nose and a striped scarf in a garden, children playing nearby.
A giant whale swimming through the clouds above a sleeping city, surreal digital art.
A wooden cabin by a frozen lake under the northern lights, green and purple sky.
A chess board with a few pieces in the middle of a game, dramatic side light.
A pair of running shoes on a wet road after the rain, reflections, product photo.
A smiling grandmother baking bread in a rustic kitchen, flour on the table, warm tones.
A hot air balloon festival over a valley at sunrise, dozens of colorful balloons.
A 3d render of a cute little house made of candy, soft pastel colors, isometric view.
A koala sleeping in a eucalyptus tree, soft focus background, nature documentary style.
A rainy window with water drops and blurred city lights behind it, moody and calm.
""".strip().splitlines()

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]

# Fixture prompts: mixed case, surrounding whitespace (incl. a tab and a newline), non-ASCII words (byte fallback and
# Unicode lower-casing), an empty prompt, and one long enough to be truncated with and without the instruction.
LONG = " ".join(["A very long caption about a Quiet harbour with many small fishing boats and seagulls,"] * 40)
PROMPTS = [
    "A Cat sleeping on a WINDOWSILL",
    "  \t a red bicycle leaning against a brick wall at sunset \n ",
    "A Café in ZÜRICH with naïve paintings and a 東京 poster",
    "",
    LONG,
    "Two dogs playing in the snow, photorealistic, 4k",
]
MAX_SEQ = 300


def build_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # training only: keep merges inside words like SentencePiece does; Gemma's tokenizer.json has no pre-tokenizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIALS + BYTES, initial_alphabet=["\n"], show_progress=False
    )
    tok.train_from_iterator(CHI + CAPTIONS, trainer)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", bos)]
    )
    # the byte tokens are plain vocabulary entries (looked up by byte fallback), not added tokens
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIALS]
    tok = Tokenizer.from_str(json.dumps(spec))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, s
    return tok


def write_tokenizer(tok, folder):
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, s in enumerate(SPECIALS)
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "mask_token": "<mask>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    special = {
        name: {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for name, s in [("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"), ("unk_token", "<unk>")]
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def jitter_norms_(module, scale):
    for n, p in module.named_parameters():
        if "norm" in n or "scale_shift_table" in n:
            p.add_(scale * torch.randn_like(p))


def write_text_encoder(vocab_size, folder):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        # smaller than the instruction-prefixed sequences (~330 tokens) so that the sliding mask bites
        sliding_window=128,
        # larger than the default 0.02 so that attention is far from uniform and mask mistakes show
        initializer_range=0.15,
        max_position_embeddings=8192,
    )
    torch.manual_seed(10)
    model = Gemma2Model(cfg).eval()
    jitter_norms_(model, 0.3)
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200KB")
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) == 2 and os.path.isfile(os.path.join(folder, "model.safetensors.index.json")), shards


def write_vae(folder):
    from diffusers import AutoencoderDC

    torch.manual_seed(11)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        encoder_block_out_channels=[8, 16, 16, 32, 32, 32],
        decoder_block_out_channels=[8, 16, 16, 32, 32, 32],
        encoder_layers_per_block=[1, 1, 1, 1, 1, 1],
        decoder_layers_per_block=[1, 1, 1, 1, 1, 1],
        encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
        decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    jitter_norms_(vae, 0.1)
    vae.save_pretrained(folder, safe_serialization=True)


def write_transformer(folder):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(12)
    transformer = SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=20,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=64,
        mlp_ratio=2.5,
        sample_size=2,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
        guidance_embeds=False,
        qk_norm="rms_norm_across_heads",
    ).eval()
    jitter_norms_(transformer, 0.1)
    transformer.save_pretrained(folder, safe_serialization=True)


def write_scheduler(folder):
    from diffusers import SCMScheduler

    SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5).save_pretrained(folder)


def write_model_index(folder):
    import diffusers

    index = {
        "_class_name": "SanaSprintPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "SCMScheduler"],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "GemmaTokenizer"],
        "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def check_tokenizer_matches_raw_file(pipe):
    """transformers rebuilds GemmaTokenizer from tokenizer.json's vocab/merges; the Rust side reads the file as
    is. Both must give the same ids (with diffusers' padding/truncation) or the fixture would test nothing."""
    raw = Tokenizer.from_file(os.path.join(OUT, "tokenizer", "tokenizer.json"))
    texts = [CHI_TEXT + p.lower().strip() for p in PROMPTS] + [p.lower().strip() for p in PROMPTS] + [CHI_TEXT]
    for t in texts:
        assert pipe.tokenizer.encode(t) == raw.encode(t).ids, t


CHI_TEXT = "\n".join(CHI)


def write_prompt_fixture():
    from diffusers import SanaPipeline, SanaSprintPipeline

    for cls in (SanaPipeline, SanaSprintPipeline):
        assert inspect.signature(cls.__call__).parameters["complex_human_instruction"].default == CHI, cls
    SanaSprintPipeline.from_pretrained(OUT)  # the folder must load with the class model_index names
    pipe = SanaPipeline.from_pretrained(OUT, dtype=torch.float32)
    assert pipe.text_encoder.dtype == torch.float32
    check_tokenizer_matches_raw_file(pipe)

    captured = []

    def capture(_module, args, kwargs):
        captured.append((args[0].clone(), kwargs["attention_mask"].clone()))

    pipe.text_encoder.register_forward_pre_hook(capture, with_kwargs=True)
    tensors, meta_cases = {}, {}
    for case, chi in [("chi", CHI), ("plain", None)]:
        captured.clear()
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            PROMPTS,
            do_classifier_free_guidance=True,
            negative_prompt="",
            device=torch.device("cpu"),
            max_sequence_length=MAX_SEQ,
            complex_human_instruction=chi,
        )
        (ids, token_mask), (neg_ids, _) = captured
        groups = [(case, ids, token_mask, embeds, mask)]
        if case == "plain":
            groups.append(("negative", neg_ids, None, neg_embeds, neg_mask))
        for name, ids_, token_mask_, emb, m in groups:
            lens = m.sum(1)
            # keep the unmasked rows (what the latent store keeps) plus up to 4 padded rows (finite, meaningless)
            rows = torch.clamp(lens + 4, max=MAX_SEQ)
            tensors[f"{name}.input_ids"] = ids_.to(torch.int64)
            if token_mask_ is not None:
                tensors[f"{name}.token_mask"] = token_mask_.to(torch.int64)
            tensors[f"{name}.mask"] = m.to(torch.int64)
            tensors[f"{name}.rows"] = rows.to(torch.int64)
            tensors[f"{name}.embeds_rows"] = torch.cat([emb[b, : rows[b]] for b in range(emb.shape[0])]).float()
            meta_cases[name] = {"prompt_len": lens.tolist(), "token_length": ids_.shape[1]}
    n_chi = len(pipe.tokenizer.encode(CHI_TEXT))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(FIXTURES, "prompt_tiny.safetensors"))
    meta = {
        "pipeline": "datasets/tiny-sana-sprint (text encoder in float32)",
        "prompts": PROMPTS,
        "max_sequence_length": MAX_SEQ,
        "n_chi": n_chi,
        "cases": meta_cases,
        "note": "chi = SanaPipeline.encode_prompt(prompts, complex_human_instruction=default CHI); plain = the same "
        "with complex_human_instruction=None; negative = the negative_prompt='' embeddings of that call (no CHI). "
        "NAME.input_ids / NAME.token_mask: what the tokenizer fed Gemma (before the [0]+last-window selection); "
        "NAME.mask: the returned (selected) attention mask; NAME.embeds_rows: the first NAME.rows[b] rows of each "
        "returned embedding row b, concatenated.",
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
    }
    with open(os.path.join(FIXTURES, "prompt_tiny.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    print("prompt fixture: n_chi", n_chi, {k: v["prompt_len"] for k, v in meta_cases.items()})


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    tok = build_tokenizer()
    write_tokenizer(tok, os.path.join(OUT, "tokenizer"))
    write_text_encoder(tok.get_vocab_size(with_added_tokens=True), os.path.join(OUT, "text_encoder"))
    write_vae(os.path.join(OUT, "vae"))
    write_transformer(os.path.join(OUT, "transformer"))
    write_scheduler(os.path.join(OUT, "scheduler"))
    write_model_index(OUT)
    write_prompt_fixture()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
