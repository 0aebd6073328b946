#!/usr/bin/env bash
# Packs what the GPU check needs beyond the working tree into one folder and tarball, for a GPU machine without
# network (docs/GPU-CHECK.md): the stripped CUDA release `sprint-bench` (scripts/build-cuda.sh --release) in bin/
# and, in wheels/, a diffusers wheel for the PyTorch reference with the pure-Python packages it imports that
# torch + transformers do not bring (requests and its dependencies). The scripts, tools/, datasets/tiny-sana-sprint and
# the docs come from the checkout the tarball is unpacked into (the device tool sends the working tree anyway, so
# packing them again would spend the lease's 64 MiB twice): `tar xJf …/sana-sprint-gpu-check.tar.xz` in the root
# of a checkout of the same commit, then `scripts/gpu-check.sh`. BUNDLE in the tarball names the commit.
#
#   scripts/gpu-bundle.sh [--out DIR] [--no-build] [--bin-dir DIR] [--all-bins] [--with-curand] [--max-mib N]
#     --out DIR      where to write sana-sprint-gpu-check/ and sana-sprint-gpu-check.tar.xz (default: ./gpu-bundle)
#     --no-build     do not build; take the binaries from --bin-dir or the release folder of the last CUDA build
#     --bin-dir DIR  take the binaries from DIR (e.g. a debug build, to test the bundle)
#     --all-bins     also pack sprint-prep and sprint-train (the check itself needs only sprint-bench)
#     --with-curand  also pack libcurand.so.10 + libcudart.so.13 (~100 MB) for machines whose PyTorch lacks them
#     --max-mib N    fail when the tarball is larger than N MiB (default 48: with the working tree, which .ci/run
#                    keeps under 16 MiB, it stays under the device tool's 64 MiB; 0 = no limit); it also fails
#                    when the tarball and this working tree together pass 63 MiB
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
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
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
mkdir -p "$dest/bin" "$dest/wheels"
bins=(sprint-bench)
[ "$all_bins" = 1 ] && bins+=(sprint-prep sprint-train)
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "no $b in $bin_dir" >&2; exit 1; }
  # symbols are not needed to run (panics still name the message and location); stripping halves the file
  strip -o "$dest/bin/$b" "$bin_dir/$b" 2>/dev/null || cp "$bin_dir/$b" "$dest/bin/"
done

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
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
printf 'sana-sprint GPU-check bundle\ncommit %s\nbuilt %s\n' "$commit" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$dest/BUNDLE"

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

# what diffusers imports that torch + transformers do not bring (pure-Python wheels, ~0.5 MB); gpu-check.sh
# installs each only where the machine's Python lacks it (Pillow, which is not pure Python, has a stand-in there)
if [ -d "$dest/wheels" ]; then
  "$py" -m pip download -q --no-deps --only-binary=:all: --implementation py --abi none --platform any \
      --python-version 3.9 -d "$dest/wheels" requests urllib3 idna certifi charset-normalizer 2>/dev/null \
    && echo "downloaded $(cd "$dest/wheels" && ls | grep -v diffusers | tr '\n' ' ')" \
    || echo "warning: could not download requests and its dependencies: a GPU machine whose Python lacks them runs no reference" >&2
fi

echo "== packing (xz)"
rm -f "$out/$name.tar.gz" "$out/$name.tar.xz"
# one xz block with a 256 MiB dictionary: the 250 MB binary repeats itself over long distances (1 MiB smaller
# than -T0's blocks; decompressing needs 256 MiB of memory)
(cd "$dest" && tar -cf - BUNDLE bin $(ls -d lib wheels pydeps 2>/dev/null)) \
  | xz -T1 --lzma2=preset=9e,dict=256MiB > "$out/$name.tar.xz"
du -sh "$dest" "$out/$name.tar.xz"
size=$(stat -c %s "$out/$name.tar.xz")
if [ "$max_mib" != 0 ] && [ "$size" -gt $(( max_mib * 1048576 )) ]; then
  echo "gpu-bundle.sh: the tarball is $(( size / 1048576 )) MiB, over the --max-mib $max_mib limit (the device tool" >&2
  echo "  sends at most 64 MiB with the working tree); leave out --all-bins / --with-curand or shrink the binary" >&2
  exit 1
fi
# the device tool's sum: tracked + untracked-not-ignored files of this checkout, plus the tarball
tree=$(git ls-files -z --cached --others --exclude-standard 2>/dev/null | xargs -0 -r stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
echo "tarball $(( size / 1048576 )) MiB + working tree $(( tree / 1048576 )) MiB = $(( (size + tree) / 1048576 )) MiB of the device tool's 64"
if [ "$max_mib" != 0 ] && [ $(( size + tree )) -gt $(( 63 * 1048576 )) ]; then
  echo "gpu-bundle.sh: tarball + working tree pass 63 MiB: a device lease (64 MiB in all) would not take them" >&2
  exit 1
fi
cat <<EOF

On the GPU machine, in the root of a checkout of the same commit (the device tool's copy of the working tree):
    tar xJf $name.tar.xz && scripts/gpu-check.sh
It writes gpu-check-<date>/gpu-check-results.{md,jsonl} (see docs/GPU-CHECK.md).
EOF
