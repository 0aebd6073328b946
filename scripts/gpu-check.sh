#!/usr/bin/env bash
# The one-go GPU check (docs/GPU-CHECK.md): on a one-GPU machine without network, in under 10 minutes,
# runs `sprint-bench parity` (device vs CPU), the sprint-bench measurements (DC-AE, Gemma-2, sprint-prep,
# training steps) and the PyTorch reference of the same measurements (tools/gpu/reference_bench.py), then prints
# one comparison table and writes it to gpu-check-results.md + gpu-check-results.jsonl.
#
#   scripts/gpu-check.sh [--out DIR] [--budget SECONDS] [--skip-ours] [--skip-reference] [--only REGEX]
#   scripts/gpu-check.sh --cpu-smoke      # the same sequence on the CPU, tiny sizes, debug build (tests the script)
#
# Run it from a checkout with the bundle made by scripts/gpu-bundle.sh unpacked into its root (bin/ holds the
# release binary, wheels/ the reference's Python packages), or from a checkout with a CUDA release build
# (scripts/build-cuda.sh --release). Environment: PYTHON (default python3; the one with
# torch + transformers), SPRINT_BENCH (the sprint-bench binary), GPU_CHECK_WORK (generated random weights, kept
# between runs; default ./gpu-check-work).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

smoke=0 out="" budget="" skip_ours=0 skip_ref=0 only=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --out) out="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --skip-ours) skip_ours=1 ;;
    --skip-reference) skip_ref=1 ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

out=${out:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
jsonl="$out/gpu-check-results.jsonl" md="$out/gpu-check-results.md" logf="$out/gpu-check.log"
: > "$jsonl"
work=${GPU_CHECK_WORK:-$root/gpu-check-work}
mkdir -p "$work"
started=$(date +%s)
say() { echo "== [$(( $(date +%s) - started ))s] $*" | tee -a "$logf"; }

# --- the binary, python, device
if [ "$smoke" = 1 ]; then
  bin=${SPRINT_BENCH:-}
  for c in "$root/bin/sprint-bench" "${CARGO_TARGET_DIR:-$root/target}/debug/sprint-bench"; do
    [ -z "$bin" ] && [ -x "$c" ] && bin="$c"
  done
  py=${PYTHON:-$( [ -x /work/venv/bin/python ] && echo /work/venv/bin/python || echo python3 )}
  dev=(--device cpu --smoke)
  budget=${budget:-100000}
  # the sampler code paths run against a stand-in nvidia-smi (fixed numbers)
  fake="$work/fake-nvidia-smi"
  printf '#!/bin/sh\ncase "$*" in *name*) echo "cpu smoke";; *) echo "37, 1234";; esac\n' > "$fake"
  chmod +x "$fake"
  export SPRINT_BENCH_NVIDIA_SMI="$fake"
else
  bin=${SPRINT_BENCH:-}
  for c in "$root/bin/sprint-bench" "${CARGO_TARGET_DIR:-$root/target}/release/sprint-bench" \
           "$HOME/.cache/sana-sprint/target/release/sprint-bench"; do
    [ -z "$bin" ] && [ -x "$c" ] && bin="$c"
  done
  py=${PYTHON:-python3}
  dev=(--device cuda)
  budget=${budget:-570}
fi
[ -x "$bin" ] || { echo "sprint-bench not found (looked in bin/ and the target folder; CARGO_TARGET_DIR or SPRINT_BENCH say where)" >&2; exit 1; }

card=cpu
if [ "$smoke" = 0 ]; then
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  [ -n "$card" ] || { echo "nvidia-smi found no GPU; this check needs one (or use --cpu-smoke)" >&2; exit 1; }
  # CUDA 13 user libraries (cuBLAS, cuRAND, NVRTC, runtime) from the local PyTorch install; the driver provides
  # libcuda.so.1 (../shared/CUDA-BUILD.md step 4)
  nv=$("$py" -c "import nvidia, os; print(list(nvidia.__path__)[0])" 2>/dev/null || true)
  libs=""
  if [ -n "$nv" ]; then
    for d in "$nv"/cu13/lib "$nv"/*/lib; do
      [ -d "$d" ] && case ":$libs:" in *":$d:"*) ;; *) libs="$libs:$d" ;; esac
    done
  fi
  # the bundle's lib/ (cuRAND, which PyTorch's wheels lack) comes after PyTorch's libraries
  [ -d "$root/lib" ] && libs="$libs:$root/lib"
  export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  missing=$(ldd "$bin" 2>/dev/null | grep "not found" || true)
  if [ -n "$missing" ]; then
    echo "sprint-bench cannot find these libraries; put the CUDA 13 user libraries on LD_LIBRARY_PATH (a PyTorch" >&2
    echo "install with CUDA 13 wheels has them under nvidia/cu13/lib). sprint-bench is skipped:" >&2
    echo "$missing" >&2
    skip_ours=1
  fi
fi
say "card: $card; sprint-bench: $bin; python: $py; results: $out; budget ${budget}s"
[ -f "$root/BUNDLE" ] && say "bundle: $(grep '^commit\|^built' "$root/BUNDLE" | tr '\n' ' ')"

# --- the reference's python environment: torch + transformers installed, diffusers from the bundled wheel
ref_ok=1
if [ "$skip_ref" = 0 ]; then
  # each bundled wheel (diffusers, and the pure-Python packages diffusers imports) only where the machine's
  # Python lacks its module, into $work/pydeps (no network, no dependencies; the environment is not modified)
  for whl in "$root"/wheels/*.whl; do
    [ -f "$whl" ] || continue
    mod=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
    if ! PYTHONPATH="$work/pydeps${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import $mod" 2>/dev/null; then
      say "installing $(basename "$whl") into $work/pydeps (no network, no dependencies)"
      "$py" -m pip install -q --no-deps --no-index --upgrade --target "$work/pydeps" "$whl" >> "$logf" 2>&1 || true
    fi
  done
  export PYTHONPATH="$work/pydeps:$root/pydeps${PYTHONPATH:+:$PYTHONPATH}"
  # Pillow: diffusers imports it, the reference never makes an image; without it a stand-in that raises on use
  if ! "$py" -c "import PIL" 2>/dev/null; then
    say "no Pillow in $py: tools/gpu/pil_standin stands in for it (diffusers imports PIL; the reference never uses it)"
    export PYTHONPATH="$PYTHONPATH:$root/tools/gpu/pil_standin"
  fi
  if ! "$py" -c "import torch, transformers, diffusers" >> "$logf" 2>&1; then
    say "the reference needs torch, transformers and diffusers importable by $py (see $logf); reference skipped"
    ref_ok=0
  elif [ "$smoke" = 0 ] && ! "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    say "torch in $py sees no GPU; reference skipped"
    ref_ok=0
  fi
else
  ref_ok=0
fi

# --- one measurement: step LIMIT_SECONDS ours|ref ARGS...; skipped when the budget is spent. Environment
# assignments before `step` (SANA_SPRINT_DEVICE_CONV=candle step ...) reach the measured process only.
step() {
  local limit=$1 who=$2; shift 2
  local left=$(( budget - ($(date +%s) - started) ))
  if [ "$who" = ours ] && [ "$skip_ours" = 1 ]; then return; fi
  if [ "$who" = ref ] && [ "$ref_ok" = 0 ]; then return; fi
  # --only: a short lease runs the measurements whose "who args" match (e.g. 'ours (parity|.*--profile)')
  if [ -n "$only" ] && ! [[ "$who $*" =~ $only ]]; then return; fi
  if [ "$left" -lt $(( limit / 2 )) ]; then
    say "skipped ($who $*): only ${left}s of the budget left"
    printf '{"schema":1,"impl":"%s","key":"%s","status":"skipped"}\n' \
      "$( [ "$who" = ours ] && echo sprint-bench || echo reference )" "$who $*" >> "$jsonl"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$who $* (limit ${limit}s)"
  local cmd
  if [ "$who" = ours ]; then
    cmd=("$bin" "${dev[@]}" --out "$jsonl" --work_dir "$work" "$@")
  else
    cmd=("$py" tools/gpu/reference_bench.py "${dev[@]}" --out "$jsonl" "$@")
  fi
  # the train steps stop themselves a little before the hard limit and report the steps done so far
  case "$1" in train-step) cmd+=(--time_limit $(( limit - 15 > 10 ? limit - 15 : 10 ))) ;; esac
  local before after rc
  before=$(wc -l < "$jsonl")
  timeout -k 10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$logf" | grep -E "^\[|^(PASS|FAIL)|^parity|rror"
  rc=${PIPESTATUS[0]}
  after=$(wc -l < "$jsonl")
  if [ "$after" = "$before" ]; then
    # nothing reported (bad arguments, missing library, killed before starting): a row that says so
    printf '{"schema":1,"impl":"%s","key":"%s","status":"error","error":"exit %s before any result (see gpu-check.log)"}\n' \
      "$( [ "$who" = ours ] && echo sprint-bench || echo reference )" "$who $*" "$rc" >> "$jsonl"
  fi
}

# --- the sequence, most informative first (pairs of ours + reference): correctness, the training step with
# its stages (the speed target), prep against the per-step encoding, the memory target (batch 1 with gradient
# checkpointing), the DC-AE encoder by block type, Gemma, batch 4, then the variants and the other sizes
# (batch 4 without checkpointing ran out of memory on both sides of a 141 GB H200 and is not run)
tsa=(--config 1.6B --resolution 1024 --mixed_precision bf16)
step 120 ours parity
step 60  ours all-reduce --config 1.6B --iters 5
step 150 ours train-step "${tsa[@]}" --batch 1 --steps 6 --profile
step 120 ref  train-step "${tsa[@]}" --batch 1 --steps 6 --profile
step 130 ours prep --rows 64 --resolution 1024 --batch_size 8
step 75  ref  encode --batch 4 --resolution 1024 --iters 3
step 120 ours train-step "${tsa[@]}" --batch 1 --gradient_checkpointing --steps 6
step 100 ref  train-step "${tsa[@]}" --batch 1 --gradient_checkpointing --steps 6
step 45  ours dcae --batch 1 --resolution 1024 --iters 5 --profile
step 60  ref  dcae --batch 1 --resolution 1024 --iters 5
step 45  ours gemma --tokens 300 --batch 8 --iters 10
step 60  ref  gemma --tokens 300 --batch 8 --iters 10
step 150 ours train-step "${tsa[@]}" --batch 4 --gradient_checkpointing --steps 6
step 120 ref  train-step "${tsa[@]}" --batch 4 --gradient_checkpointing --steps 6
# the variants the first H200 lease measured without a difference (kept to watch other cards)
SANA_SPRINT_CUDA_POOL_RELEASE=0 step 100 ours train-step "${tsa[@]}" --batch 1 --gradient_checkpointing --steps 6
SANA_SPRINT_DEVICE_CONV=candle step 45 ours dcae --batch 1 --resolution 1024 --iters 5
if [ "$smoke" = 0 ]; then
  step 60  ours dcae --batch 8 --resolution 1024 --iters 3
  step 90  ref  dcae --batch 8 --resolution 1024 --iters 3
  step 45  ours gemma --tokens 300 --batch 1 --iters 10
  step 60  ref  gemma --tokens 300 --batch 1 --iters 10
  step 45  ours dcae --batch 8 --resolution 1024 --iters 3 --tf32
fi

# the log is kept short enough to travel back from a device machine (the device tool returns files of at most
# 16 MiB): over 4 MiB, its first 1 MiB and last 2 MiB stay
if [ "$(stat -c %s "$logf")" -gt 4194304 ]; then
  { head -c 1048576 "$logf"; printf '\n[... gpu-check.sh: %s bytes of the log cut ...]\n' "$(stat -c %s "$logf")"
    tail -c 2097152 "$logf"; } > "$logf.trim" && mv "$logf.trim" "$logf"
fi
say "done; table:"
"$py" tools/gpu/make_table.py "$jsonl" --card "$card" --md "$md" | tee -a "$logf"
echo
echo "results: $md, $jsonl (log: $logf)"
parity=$("$py" -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(([r["status"] for r in rows if r.get("bench") == "parity" and r.get("impl") == "sprint-bench"] or ["missing"])[-1])' "$jsonl")
case "$parity" in
  ok) ;;
  fail) echo "parity FAILED (see the PASS/FAIL lines in $logf)" >&2; exit 1 ;;
  *) [ "$skip_ours" = 1 ] || { echo "parity did not finish ($parity; see $logf)" >&2; exit 1; } ;;
esac
