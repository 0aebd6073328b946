#!/usr/bin/env bash
# The Python environment the tests and CI use next to cargo: pylance/pyarrow/numpy to read stores as users do
# (tools/read_store.py, tools/compare_stores.py) and moto's S3 server for the s3:// test (a local
# S3-compatible endpoint on loopback). Prints the interpreter's path.
#
#   scripts/py-env.sh            -> $SANA_SPRINT_PY_VENV (default ~/.cache/sana-sprint/py-venv)/bin/python
set -euo pipefail
venv="${SANA_SPRINT_PY_VENV:-$HOME/.cache/sana-sprint/py-venv}"
pins=(pylance==14.0.2 pyarrow==26.0.1 numpy==2.4.6 "moto[server]==5.2.5" tensorboard==2.21.0)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "${pins[*]}" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}" >&2
  echo "${pins[*]}" > "$venv/.pins"
fi
echo "$venv/bin/python"
