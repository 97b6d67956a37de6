"""Where a short prompt's time to first token goes, ours against llama-server.

    python3 benches/ttft_parts.py           # BENCH_QUICK=1: a few requests each, for CI's smoke

Starts target/release/inference-core (--log-level debug) and
target/llama-tools/bin/llama-server alike (-t 2, -np 4, -c 4096,
llama-server with --kv-unified), one after the other, never side by side.
Sends 20 single requests (after 3 warm-ups) of a 7-token prompt, a fresh
one each time (no prefix cache), 4 tokens out, one at a time. Prints the
client-side TTFT p50 of both, and for ours the median of each station the
engine logs for a request (reaching the engine, tokenizing and building
its sampler, until its first step, the prefill decode, sampling) and the
rest (the reactor's delivery to the client). Needs websockets.
"""
import asyncio, http.client, json, os, re, statistics, time

import websockets

from servers import QUICK, ROOT, start_llama_server, start_ours, stop

RUNS, WARM = (3, 1) if QUICK else (20, 3)


def prompt(i):
    return f"Question {i}: the capital of France is"


async def ours(port):
    out = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.recv()
        for i in range(WARM + RUNS):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"op": "infer", "id": f"r{i}", "prompt": prompt(i),
                                      "params": {"temp": 0, "max_tokens": 4, "ignore_eos": True}}))
            first = None
            while True:
                m = json.loads(await ws.recv())
                if m["op"] == "token" and first is None:
                    first = time.perf_counter() - t0
                if m["op"] in ("end", "error"):
                    break
            if i >= WARM:
                out.append((f"r{i}", first * 1e3, m["stats"]["ttft_ms"]))
    return out


def theirs(port):
    out = []
    for i in range(WARM + RUNS):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.connect()  # connected before the clock starts, as our WebSocket is
        body = json.dumps({"prompt": prompt(i), "n_predict": 4, "temperature": 0, "stream": True,
                           "ignore_eos": True, "cache_prompt": True})
        t0 = time.perf_counter()
        c.request("POST", "/completion", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        first = None
        for line in r:
            if line.startswith(b"data: ") and first is None and json.loads(line[6:]).get("content"):
                first = time.perf_counter() - t0
        c.close()
        if i >= WARM:
            out.append(first * 1e3)
    return out


def main():
    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    log = open(os.path.join(ROOT, "target/bench/ttft-ours.log"), "w")
    ic, port = start_ours(["-t", "2", "--parallel", "4", "--log-level", "debug"], stderr=log)
    try:
        mine = asyncio.run(ours(port))
    finally:
        stop(ic)
    log.close()
    text = open(os.path.join(ROOT, "target/bench/ttft-ours.log")).read()
    names = ["reaching the engine", "tokenizing and building its sampler", "until its first step",
             "prefill decodes", "of other work between them", "sampling"]
    parts = {n: [] for n in names}
    for rid, _, _ in mine:
        m = re.search(rf"request {rid}: TTFT [\d.]+ ms: ([\d.]+) reaching the engine, ([\d.]+) tokenizing and "
                      rf"building its sampler, ([\d.]+) until its first step, ([\d.]+) in \d+ prefill decodes "
                      rf"\(\+([\d.]+) of other work between them\), ([\d.]+) sampling", text)
        if m:
            for n, v in zip(names, m.groups()):
                parts[n].append(float(v))
    ls, port = start_llama_server()
    try:
        ref = theirs(port)
    finally:
        stop(ls)
    client = statistics.median(c for _, c, _ in mine)
    server = statistics.median(s for _, _, s in mine)
    print(f"TTFT p50, client side: ours {client:.2f} ms, llama-server {statistics.median(ref):.2f} ms "
          f"(ratio {client / statistics.median(ref):.2f})")
    print(f"ours, engine receipt to first token (stats.ttft_ms) p50: {server:.2f} ms; "
          f"the rest (client to reactor, reactor to client): {client - server:.2f} ms")
    for n in names:
        if parts[n]:
            print(f"  {n:>38}: {statistics.median(parts[n]):.2f} ms")


if __name__ == "__main__":
    main()
