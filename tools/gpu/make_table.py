"""The GPU check's comparison table: joins the JSON lines of `sprint-bench` ("ours") and
tools/gpu/reference_bench.py ("reference") by key and metric and prints one Markdown table.

    python tools/gpu/make_table.py RESULTS.jsonl [--card NAME] [--md OUT.md] [--title TEXT]

Standard library only. For each (impl, key) the last line wins; a key whose last line is "started" was killed
(time limit or crash) and shows as such. Columns: what, ours, reference, ours/ref, verdict (which side is better
by how much: throughput higher is better, seconds and memory lower is better, GPU busy % is shown as the
difference in points).
"""
import argparse
import json
import sys

# (key prefix, [(metric, label)]) in display order; other keys follow with all their numeric metrics
LAYOUT = [
    ("parity", [("failed", "parity: failed checks (tiny models, device vs CPU; f32 1e-4, bf16 3e-2)")]),
    ("all-reduce", [("init_s", "rendezvous + NCCL id exchange + communicator s"),
                    ("f32_s", "bucketed gradient average, f32, s per step"),
                    ("bf16_s", "bucketed gradient average, bf16, s per step"),
                    ("f32_copy_s", "one device copy of the f32 gradient s (scale)"),
                    ("params", "gradient elements")]),
    ("dcae", [("images_per_s", "images/s")]),
    ("gemma2-2b", [("prompts_per_s", "prompts/s")]),
    ("encoding", [("samples_per_s", "samples/s: ours sprint-prep (steady) vs reference per-step encoding"),
                  ("rows_per_s_end_to_end", "rows/s end to end incl. model load (ours only)")]),
    ("train-step", [("g_step_s", "G step s"),
                    ("d_step_s", "D step s"),
                    ("g_step_plus_encode_s", "G step s incl. per-step encoding (ours: none needed)"),
                    ("peak_mem_gib", "peak GPU memory GiB (device-wide)"),
                    ("alloc_peak_gib", "allocator peak GiB (ours: CUDA pool used high; ref: torch max_memory_allocated)"),
                    ("gpu_busy_pct", "GPU busy % during timed steps")]),
]
HIGHER_BETTER = ("_per_s",)


def load(paths):
    rows = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                impl = "ours" if r.get("impl") == "sprint-bench" else "reference"
                rows[(impl, r.get("key", "?"))] = r
    return rows


def fmt(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def cell(r, metric):
    """The value shown for a result line: a number, or what happened instead."""
    if r is None:
        return None, "–"
    status = r.get("status")
    if status == "started":
        return None, "killed (time limit or crash)"
    if status == "skipped":
        return None, "skipped (time budget)"
    if status == "error":
        err = str(r.get("error", "error"))
        short = "out of memory" if "out of memory" in err.lower() or "OUT_OF_MEMORY" in err else err[:60]
        return None, f"error: {short}"
    if metric == "status":
        return None, "ok" if status == "ok" else str(status)
    v = r.get("metrics", {}).get(metric)
    if metric == "alloc_peak_gib":
        v = r.get("metrics", {}).get("pool_used_high_gib" if r.get("impl") == "sprint-bench"
                                     else "torch_max_allocated_gib")
    if metric == "g_step_plus_encode_s" and r.get("impl") == "sprint-bench":
        v = r.get("metrics", {}).get("g_step_s")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        suffix = " (partial)" if status in ("partial", "timeout") else ""
        return float(v), fmt(v) + suffix
    if v is None:
        return None, "–"
    return None, str(v)


def verdict(metric, ours, ref):
    if ours is None or ref is None:
        return "", ""
    if metric == "gpu_busy_pct":
        return "", f"{ours - ref:+.0f} pts"
    if metric == "failed":
        return "", ""
    if ours == 0 or ref == 0:
        return "", ""
    ratio = ours / ref
    if metric.endswith(HIGHER_BETTER):
        better = ratio
    else:
        better = 1 / ratio
    word = "faster" if not metric.endswith("_gib") else "less memory"
    if better >= 1:
        text = f"ours {better:.2f}× {word}" if word == "faster" else f"ours uses {1 / better:.2f}× the memory"
    else:
        text = f"ours {1 / better:.2f}× slower" if word == "faster" else f"ours uses {1 / better:.2f}× the memory"
    return f"{ratio:.2f}", text


def table(rows, card):
    keys = sorted({k for _, k in rows}, key=lambda k: (min([i for i, (p, _) in enumerate(LAYOUT)
                                                          if k.startswith(p)] or [len(LAYOUT)]), k))
    out = ["| what | ours | reference | ours/ref | verdict |", "|---|---|---|---|---|"]
    for key in keys:
        ours_r, ref_r = rows.get(("ours", key)), rows.get(("reference", key))
        layout = next((m for p, m in LAYOUT if key.startswith(p)), None)
        if layout is None:
            metrics = sorted({m for r in (ours_r, ref_r) if r for m, v in r.get("metrics", {}).items()
                              if isinstance(v, (int, float))})
            layout = [(m, m) for m in metrics] or [("status", "(no result)")]
        if key.startswith("dcae"):
            # --profile: seconds per block type of one synchronised pass
            stages = [m for r in (ours_r, ref_r) for m in (r or {}).get("metrics", {}) if m.startswith("stage_")]
            layout = layout + [(m, f"{m[6:-2]} s (one synchronised pass)") for m in dict.fromkeys(stages)]
        if key.startswith("train-step"):
            # --profile: the stages of either side, G then D, in the order they ran
            stages = []
            for phase in ("g_stage_", "d_stage_"):
                for r in (ours_r, ref_r):
                    for m in (r or {}).get("metrics", {}):
                        if m.startswith(phase) and m not in stages:
                            stages.append(m)
            layout = layout + [(m, f"{m[0].upper()} stage {m[8:-9]} peak GiB (CUDA pool, live tensors)")
                               if m.endswith("_peak_gib") else (m, f"{m[0].upper()} stage {m[8:-2]} s (synchronised)")
                               for m in stages]
        if layout and all(cell(r, m)[0] is None for r in (ours_r, ref_r) for m, _ in layout) \
                and not key.startswith("parity"):
            layout = [("status", "(no result)")]
        for metric, label in layout:
            ov, ot = cell(ours_r, metric)
            rv, rt = cell(ref_r, metric)
            if metric == "failed" and ours_r is not None and ours_r.get("status") in ("ok", "fail"):
                m = ours_r.get("metrics", {})
                ot = ("PASS" if m.get("failed") == 0 else "FAIL") + f" ({m.get('failed')} of {m.get('checks')} failed; " \
                     f"worst f32 {fmt(m.get('worst_rel_f32'))}, bf16 {fmt(m.get('worst_rel_bf16'))})"
            if ot == "–" and rt == "–":
                continue
            ratio, text = verdict(metric, ov, rv)
            what = f"{key}: {label}" if not key.startswith("parity") else label
            out.append(f"| {what} | {ot} | {rt} | {ratio} | {text} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--card", help="the accelerator's name (default: from the result lines)")
    ap.add_argument("--md", help="also write the table (with a header) to this Markdown file")
    ap.add_argument("--title", default="sana-sprint GPU check")
    args = ap.parse_args()
    rows = load(args.results)
    if not rows:
        sys.exit("no result lines found")
    cards = sorted({r.get("card", "?") for r in rows.values() if r.get("card")})
    card = args.card or ", ".join(cards)
    versions = {}
    for r in rows.values():
        versions.update({f"{r.get('impl')}:{k}": v for k, v in (r.get("versions") or {}).items()})
    smoke = any(r.get("smoke") for r in rows.values())
    head = [f"# {args.title}", "", f"card: **{card}**" + ("  (SMOKE RUN: tiny sizes, numbers meaningless)" if smoke
                                                         else ""),
            "", "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]
    text = table(rows, card)
    print("\n".join(head[:3]))
    print(text)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write("\n".join(head) + "\n" + text + "\n\nSee docs/GPU-CHECK.md for what each row means.\n")


if __name__ == "__main__":
    main()
