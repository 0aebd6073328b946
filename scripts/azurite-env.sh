#!/usr/bin/env bash
# Azurite, Microsoft's Azure Storage emulator (node), for the az:// store tests (`--features azure`,
# tests/suite/object_stores.rs): installed with npm at a pinned version under $SANA_SPRINT_AZURITE_DIR (default
# ~/.cache/sana-sprint/azurite). Prints the path of its `azurite-blob` executable (the Blob service only), which
# the tests find there or at SANA_SPRINT_AZURITE.
#
#   scripts/azurite-env.sh       -> ~/.cache/sana-sprint/azurite/node_modules/.bin/azurite-blob
set -euo pipefail
dir="${SANA_SPRINT_AZURITE_DIR:-$HOME/.cache/sana-sprint/azurite}"
pin=azurite@3.37.0
bin="$dir/node_modules/.bin/azurite-blob"
if [ ! -x "$bin" ] || [ "$(cat "$dir/.pin" 2>/dev/null)" != "$pin" ]; then
  command -v npm >/dev/null 2>&1 || { echo "scripts/azurite-env.sh: npm (node 18 or newer) is needed" >&2; exit 1; }
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-save --no-audit --no-fund --loglevel=error "$pin" >&2
  echo "$pin" > "$dir/.pin"
fi
echo "$bin"
