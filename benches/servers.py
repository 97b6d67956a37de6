"""What the Python benches share: starting our release server and llama-server
alike on free ports, one at a time, and waiting until they answer /health."""
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.expanduser("~/.cache/inference-core/models/gemma-3-270m-q4_k_m.gguf")
# BENCH_QUICK=1: a bench's smoke run (CI), fewer and shorter requests.
QUICK = os.environ.get("BENCH_QUICK") == "1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port):
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"no server on {port}")


def start_ours(args, stderr=subprocess.DEVNULL, state="/tmp/bench-state", binary=None):
    """target/release/inference-core (or `binary`, else `BENCH_SERVER_BIN`: another build) with
    `args` (-t 2 --parallel 4 ...); returns (process, port)."""
    port = free_port()
    binary = binary or os.environ.get("BENCH_SERVER_BIN") or os.path.join(ROOT, "target/release/inference-core")
    p = subprocess.Popen([binary, "--port", str(port), *args],
                         stderr=stderr, env={**os.environ, "INFERENCE_CORE_STATE": state})
    wait_http(port)
    return p, port


def start_llama_server(threads=2, slots=4, ctx=4096, extra=()):
    """target/llama-tools/bin/llama-server on the default model, one KV cache for all slots; `extra` args."""
    port = free_port()
    p = subprocess.Popen([os.path.join(ROOT, "target/llama-tools/bin/llama-server"), "-m", MODEL, "--host",
                          "127.0.0.1", "--port", str(port), "-t", str(threads), "-np", str(slots), "-c", str(ctx),
                          "--kv-unified", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(port)
    return p, port


def stop(p):
    p.terminate()
    p.wait()
