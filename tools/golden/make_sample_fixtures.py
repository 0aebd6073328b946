"""sprint-sample's resolution binning against diffusers: `PixArtImageProcessor.classify_height_width_bin` over
`ASPECT_RATIO_1024_BIN` (what `SanaSprintPipeline` does for 1024 px students) and
`PixArtImageProcessor.resize_and_crop_tensor` (bilinear `F.interpolate`, align_corners=False, centre crop).

Outputs (tests/fixtures/):
    sample_bins_ref.json          {"choices": [[h, w, bin_h, bin_w], ...], "resizes": [{name, from [h, w], to [h, w]}]}
    sample_bins_ref.safetensors   NAME.in (1, 3, h, w) f32, NAME.out (1, 3, new_h, new_w) f32

Pinned versions: torch 2.15.0 (CPU), diffusers 0.42.1. Run from the repository root:
    python tools/golden/make_sample_fixtures.py
"""
import json
import os

import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN
from safetensors.torch import save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def main():
    sizes = {(h, w) for h in range(64, 2049, 64) for w in range(64, 2049, 64)}
    keys = list(ASPECT_RATIO_1024_BIN)
    for a, b in zip(keys, keys[1:]):  # sizes at and beside the midpoints between keys
        mid = (float(a) + float(b)) / 2
        for w in (100, 1000, 1024):
            for dh in (-1, 0, 1):
                sizes.add((round(mid * w) + dh, w))
    choices = []
    for h, w in sorted(sizes):
        bh, bw = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=ASPECT_RATIO_1024_BIN)
        choices.append([h, w, bh, bw])

    gen = torch.Generator().manual_seed(0)
    tensors, resizes = {}, []
    # (sampled h, w) -> (requested h, w): down- and up-scales, either ratio winning, odd margins, identity
    for name, (h, w), (nh, nw) in [
        ("down_wide", (64, 96), (40, 50)), ("down_tall", (96, 64), (50, 33)), ("up", (32, 48), (70, 90)),
        ("up_odd", (32, 32), (45, 61)), ("same", (32, 64), (32, 64)), ("one_side", (64, 64), (64, 50)),
    ]:
        x = torch.randn(1, 3, h, w, generator=gen)
        y = PixArtImageProcessor.resize_and_crop_tensor(x, nw, nh)
        assert y.shape == (1, 3, nh, nw), y.shape
        tensors[name + ".in"] = x.contiguous()
        tensors[name + ".out"] = y.contiguous().clone()
        resizes.append({"name": name, "from": [h, w], "to": [nh, nw]})
    save_file(tensors, os.path.join(FIXTURES, "sample_bins_ref.safetensors"))
    with open(os.path.join(FIXTURES, "sample_bins_ref.json"), "w") as f:
        json.dump({"choices": choices, "resizes": resizes}, f, separators=(",", ":"))
    print(f"{len(choices)} bin choices, {len(resizes)} resizes")


if __name__ == "__main__":
    main()
