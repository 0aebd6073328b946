#!/usr/bin/env bash
# Builds the `cuda` feature on a machine without a GPU, following ../shared/CUDA-BUILD.md:
# the CUDA 13.0 toolchain and libraries from PyPI (pinned: the GPU machines' driver speaks CUDA 13.0), a
# link-time stub of libcuda (the driver, absent here; the real one is used at run time) and unversioned
# library names on LIBRARY_PATH (not RUSTFLAGS, so the CPU build's artifacts stay valid).
#
#   scripts/build-cuda.sh [--release] [extra cargo args]     -> $CARGO_TARGET_DIR/{debug,release}/sprint-*
#
# CUDA_VENV (default ~/.cache/sana-sprint/cuda13-venv) caches the toolchain; CUDA_COMPUTE_CAP defaults to 90
# (H100/H200); CUDA_FEATURES (default `nccl`, which implies `cuda`) the cargo features (`cuda` alone: no NCCL,
# single-GPU runs only).
set -euo pipefail
# Every failure says where it happened (a failed command substitution under pipefail is otherwise silent).
trap 'echo "build-cuda.sh: failed at line $LINENO (exit $?): $BASH_COMMAND" >&2' ERR
# lance's build needs protoc (a fresh machine lacks it; the build would fail after many minutes)
[ -n "${PROTOC:-}" ] || command -v protoc >/dev/null 2>&1 || { echo "build-cuda.sh: protoc not found: apt-get install protobuf-compiler (or set PROTOC)" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sana-sprint/target}"
venv="${CUDA_VENV:-$HOME/.cache/sana-sprint/cuda13-venv}"
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
      nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.2.14 "nvidia-curand<10.5" nvidia-cuda-nvrtc==13.0.88
      nvidia-nccl-cu13==2.30.7)
stamp="$venv/.sana-sprint-pins"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" > "$stamp"
fi
cu=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
[ -x "$cu/bin/nvcc" ] || { echo "build-cuda.sh: nvcc not found under $cu (delete $venv and rerun)" >&2; exit 1; }

# Unversioned names for the linker, and the libcuda stub.
links="$root/target-cuda-link"
mkdir -p "$links"
for lib in cublas cublasLt curand nvrtc cudart; do
  f=$(find "$cu/lib" -maxdepth 1 -name "lib$lib.so.*" 2>/dev/null | sort | head -n 1 || true)
  [ -n "$f" ] || { echo "build-cuda.sh: lib$lib not found in $cu/lib (pip install of the CUDA wheels incomplete?)" >&2; exit 1; }
  ln -sf "$f" "$links/lib$lib.so"
done
# NCCL (the `nccl` feature: multi-GPU training) has its own folder in the wheels
nccl=$(find "$(dirname "$cu")/nccl/lib" -maxdepth 1 -name "libnccl.so.*" 2>/dev/null | sort | head -n 1 || true)
[ -n "$nccl" ] || { echo "build-cuda.sh: libnccl not found under $(dirname "$cu")/nccl/lib (nvidia-nccl-cu13 wheel incomplete?)" >&2; exit 1; }
ln -sf "$nccl" "$links/libnccl.so"
cargo fetch -q
# cudarc's sources, where cargo keeps its registry: $CARGO_HOME (default ~/.cargo).
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
sys=$(find "$registry" -maxdepth 5 -type d -path '*/cudarc-0.19.*/src/driver/sys' 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$sys" ] || { echo "build-cuda.sh: cudarc 0.19 sources not found under $registry (is CARGO_HOME right? did cargo fetch fail?)" >&2; exit 1; }
if [ ! -f "$links/libcuda.so.1" ] || [ "$sys" -nt "$links/libcuda.so.1" ]; then
  grep -rhoE '\bfn cu[A-Za-z0-9_]+\s*\(' "$sys" | sed -E 's/fn (cu[A-Za-z0-9_]+).*/\1/' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; /* CUDA_ERROR_UNKNOWN: link-time stub only */ }"}' > "$links/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so.1" "$links/cuda_stub.c"
  ln -sf libcuda.so.1 "$links/libcuda.so"
fi

export PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$links${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --features "${CUDA_FEATURES:-nccl}" --bins "$@"
echo "CUDA build done (toolchain $cu). On a GPU machine put the CUDA 13 libraries on LD_LIBRARY_PATH (see README)."
