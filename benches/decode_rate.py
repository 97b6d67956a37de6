"""Single-stream decode rate, greedy and sampled, ours against llama-server.

    python3 benches/decode_rate.py          # BENCH_QUICK=1: one short run each, for CI's smoke

Starts target/release/inference-core and target/llama-tools/bin/llama-server
alike (-t 2, -np 4, -c 4096, llama-server with --kv-unified), one after the
other, never side by side. Each is sent, one at a time, 5 requests of 256
tokens (ignore_eos) at temperature 0 and 5 at 0.8 (top-k 40, top-p 0.95,
min-p 0.05 on both), after a warm-up, and its decode rate is read from the
client: tokens after the first over the time since the first. Prints the
medians and the ratios ours / llama-server. Needs websockets.
"""
import asyncio, http.client, json, statistics, time

import websockets

from servers import QUICK, start_llama_server, start_ours, stop

RUNS, N = (1, 32) if QUICK else (5, 256)
SAMPLING = {"top_k": 40, "top_p": 0.95, "min_p": 0.05}
PROMPT = "Once upon a time, in a village by the sea,"


def rate(arrivals):
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


async def ours(port, temp):
    out = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.recv()
        for i in range(RUNS + 1):
            params = {"temp": temp, "max_tokens": N, "ignore_eos": True, "seed": i, **SAMPLING}
            await ws.send(json.dumps({"op": "infer", "id": f"r{i}", "prompt": PROMPT, "params": params}))
            arrivals = []
            while True:
                m = json.loads(await ws.recv())
                if m["op"] == "token":
                    arrivals.append(time.perf_counter())
                if m["op"] in ("end", "error"):
                    break
            if i > 0:
                out.append(rate(arrivals))
    return statistics.median(out)


def theirs(port, temp):
    out = []
    for i in range(RUNS + 1):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"prompt": PROMPT, "n_predict": N, "temperature": temp, "stream": True, "ignore_eos": True,
                "seed": i, **SAMPLING}
        c.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        arrivals = []
        for line in c.getresponse():
            if line.startswith(b"data: ") and json.loads(line[6:]).get("content"):
                arrivals.append(time.perf_counter())
        c.close()
        if i > 0:
            out.append(rate(arrivals))
    return statistics.median(out)


def main():
    ic, port = start_ours(["-t", "2", "--parallel", "4"])
    try:
        mine = {t: asyncio.run(ours(port, t)) for t in (0, 0.8)}
    finally:
        stop(ic)
    ls, port = start_llama_server()
    try:
        ref = {t: theirs(port, t) for t in (0, 0.8)}
    finally:
        stop(ls)
    for t in (0, 0.8):
        print(f"temp {t}: ours {mine[t]:.1f} tok/s, llama-server {ref[t]:.1f} tok/s, ratio {mine[t] / ref[t]:.2f}")


if __name__ == "__main__":
    main()
