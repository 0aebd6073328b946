"""Loads a TensorBoard log directory with TensorBoard's own EventAccumulator and prints what it holds, as JSON.

    python tools/read_tensorboard.py LOGDIR      (needs: pip install tensorboard; TensorFlow is not needed)

Prints one JSON object:
    {"scalars": {TAG: [[step, value, f32_bits, wall_time_f64_bits], ...]},
     "images":  {TAG: [[step, width, height, len(encoded), sha256(encoded) hex], ...]}}
in the order TensorBoard keeps them. The bit patterns (of the value as f32, and of the wall time as f64) let a
caller compare exactly without trusting a float parser; a non-finite value is printed as a string ("nan", "inf").
Every event is kept (no reservoir sampling), and orphaned events are purged as `tensorboard --load_fast=false`
does (SessionLog START).
"""
import hashlib
import json
import math
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator as ea


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
acc.Reload()
tags = acc.Tags()
out = {"scalars": {}, "images": {}}
for tag in tags[ea.SCALARS]:
    out["scalars"][tag] = [
        [e.step, e.value if math.isfinite(e.value) else repr(e.value), f32_bits(e.value), f64_bits(e.wall_time)]
        for e in acc.Scalars(tag)
    ]
for tag in tags[ea.IMAGES]:
    out["images"][tag] = [
        [e.step, e.width, e.height, len(e.encoded_image_string), hashlib.sha256(e.encoded_image_string).hexdigest()]
        for e in acc.Images(tag)
    ]
print(json.dumps(out, sort_keys=True))
