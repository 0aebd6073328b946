#!/usr/bin/env bash
# Packs what the GPU check needs into one folder and tarball to copy to a GPU machine without network
# (docs/GPU-CHECK.md): the stripped CUDA release `sprint-bench` (scripts/build-cuda.sh --release), scripts/,
# tools/, datasets/tiny-sana-sprint, docs/GPU-CHECK.md and a diffusers wheel for the PyTorch reference.
#
#   scripts/gpu-bundle.sh [--out DIR] [--no-build] [--bin-dir DIR] [--all-bins] [--with-curand] [--max-mib N]
#     --out DIR      where to write sana-sprint-gpu-check/ and sana-sprint-gpu-check.tar.xz (default: ./gpu-bundle)
#     --no-build     do not build; take the binaries from --bin-dir or the release folder of the last CUDA build
#     --bin-dir DIR  take the binaries from DIR (e.g. a debug build, to test the bundle)
#     --all-bins     also pack sprint-prep and sprint-train (the check itself needs only sprint-bench)
#     --with-curand  also pack libcurand.so.10 + libcudart.so.13 (~100 MB) for machines whose PyTorch lacks them
#     --max-mib N    fail when the tarball is larger than N MiB (default 48: with the ~13 MiB working tree it
#                    stays under the device tool's 64 MiB; 0 = no limit)
#
# Nothing is downloaded except the diffusers 0.42.1 wheel (pip download, no dependencies). Without network it
# falls back to a copy of an installed diffusers package (PYTHON, default python3), else says what to do.
set -euo pipefail
trap 'echo "gpu-bundle.sh: failed at line $LINENO (exit $?): $BASH_COMMAND" >&2' ERR
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$root/gpu-bundle build=1 bin_dir="" all_bins=0 curand=0 max_mib=48
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --no-build) build=0 ;;
    --bin-dir) bin_dir="$2"; build=0; shift ;;
    --all-bins) all_bins=1 ;;
    --with-curand) curand=1 ;;
    --max-mib) max_mib="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sana-sprint/target}"
py=${PYTHON:-python3}

if [ "$build" = 1 ]; then
  echo "== building the CUDA release binaries (scripts/build-cuda.sh --release)"
  scripts/build-cuda.sh --release
fi
bin_dir=${bin_dir:-$CARGO_TARGET_DIR/release}
[ -x "$bin_dir/sprint-bench" ] || { echo "no sprint-bench in $bin_dir (build first, or pass --bin-dir)" >&2; exit 1; }
if ! readelf -d "$bin_dir/sprint-bench" 2>/dev/null | grep -q 'libcuda.so'; then
  echo "warning: $bin_dir/sprint-bench is not linked against CUDA (a CPU build): the GPU check will fail on the GPU" >&2
fi

name=sana-sprint-gpu-check
dest="$out/$name"
rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/scripts" "$dest/tools" "$dest/datasets" "$dest/docs" "$dest/wheels"
bins=(sprint-bench)
[ "$all_bins" = 1 ] && bins+=(sprint-prep sprint-train)
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "no $b in $bin_dir" >&2; exit 1; }
  # symbols are not needed to run (panics still name the message and location); stripping halves the file
  strip -o "$dest/bin/$b" "$bin_dir/$b" 2>/dev/null || cp "$bin_dir/$b" "$dest/bin/"
done
cp scripts/gpu-check.sh scripts/gpu-bundle.sh "$dest/scripts/"
cp -r tools/gpu "$dest/tools/"
cp tools/*.py "$dest/tools/" 2>/dev/null || true
cp -r datasets/tiny-sana-sprint "$dest/datasets/"

# Some PyTorch CUDA 13 installs bring cuBLAS, NVRTC and the runtime but not cuRAND, which candle links: with
# --with-curand ship the pinned build toolchain's libcurand (and the small runtime) in lib/; gpu-check.sh puts it
# after PyTorch's. Without it the GPU machine's own nvidia-curand is used (gpu-check.sh names any missing library).
venv="${CUDA_VENV:-$HOME/.cache/sana-sprint/cuda13-venv}"
cu=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null || true)
if [ "$curand" = 0 ]; then
  :
elif [ -n "$cu" ] && [ -f "$cu/libcurand.so.10" ]; then
  mkdir -p "$dest/lib"
  cp -L "$cu"/libcurand.so.10 "$cu"/libcudart.so.13 "$dest/lib/"
else
  echo "warning: no libcurand.so.10 in the CUDA build venv ($venv); the GPU machine must provide it" >&2
fi
cp docs/GPU-CHECK.md "$dest/docs/"
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +

echo "== diffusers wheel for the reference"
if "$py" -m pip download -q diffusers==0.42.1 --no-deps -d "$dest/wheels" 2>/dev/null \
   && ls "$dest"/wheels/diffusers-0.42.1-*.whl >/dev/null 2>&1; then
  echo "downloaded $(basename "$dest"/wheels/diffusers-*.whl)"
else
  rmdir "$dest/wheels" 2>/dev/null || true
  pkg=$("$py" -c "import diffusers, os; assert diffusers.__version__ == '0.42.1'; print(os.path.dirname(diffusers.__file__))" 2>/dev/null || true)
  if [ -n "$pkg" ]; then
    mkdir -p "$dest/pydeps"
    cp -r "$pkg" "$dest/pydeps/"
    find "$dest/pydeps" -name __pycache__ -type d -prune -exec rm -rf {} +
    echo "no network for pip download: copied the installed diffusers 0.42.1 package ($pkg) to pydeps/"
  else
    echo "WARNING: could not download the diffusers 0.42.1 wheel (no network?) and $py has no diffusers 0.42.1" >&2
    echo "  to copy. Put diffusers-0.42.1-py3-none-any.whl into $dest/wheels/ by hand, or make sure diffusers is" >&2
    echo "  installed on the GPU machine; otherwise the reference measurements are skipped there." >&2
  fi
fi

echo "== packing (xz)"
rm -f "$out/$name.tar.gz" "$out/$name.tar.xz"
tar -C "$out" -cf - "$name" | xz -T0 -9e > "$out/$name.tar.xz"
du -sh "$dest" "$out/$name.tar.xz"
size=$(stat -c %s "$out/$name.tar.xz")
if [ "$max_mib" != 0 ] && [ "$size" -gt $(( max_mib * 1048576 )) ]; then
  echo "gpu-bundle.sh: the tarball is $(( size / 1048576 )) MiB, over the --max-mib $max_mib limit (the device tool" >&2
  echo "  sends at most 64 MiB with the working tree); leave out --all-bins / --with-curand or shrink the binary" >&2
  exit 1
fi
cat <<EOF

Copy $out/$name.tar.xz to the GPU machine, then there:
    tar xJf $name.tar.xz && cd $name && scripts/gpu-check.sh
It writes gpu-check-<date>/gpu-check-results.{md,jsonl} (see docs/GPU-CHECK.md).
EOF
