"""A single greedy stream's decode rate with busy-loop processes beside the server.

    python3 benches/cpu_hog.py PORT HOGS     # a running inference-core; HOGS busy loops (0: alone)

Five requests of 96 tokens (the first a warm-up); prints the median decode tok/s
and TTFT (ms) from the server's `end` stats. Run it with 0, 1 and 2 hogs in one
sitting and compare the ratios; nothing else should run meanwhile.
"""
import asyncio
import json
import multiprocessing
import statistics
import sys
import time

import websockets


def hog(seconds):
    end = time.time() + seconds
    while time.time() < end:
        pass


async def measure(port):
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.recv()
        tps, ttft = [], []
        for i in range(int(sys.argv[3]) if len(sys.argv) > 3 else 5):
            params = {"temp": 0, "max_tokens": 96, "ignore_eos": True}
            await ws.send(json.dumps({"op": "infer", "id": "r", "prompt": f"Story {i}: Once upon a time",
                                      "params": params}))
            while True:
                m = json.loads(await ws.recv())
                if m["op"] == "end":
                    if i > 0:
                        tps.append(m["stats"]["tps"])
                        ttft.append(m["stats"]["ttft_ms"])
                    break
        return statistics.median(tps), statistics.median(ttft)


if __name__ == "__main__":
    port, hogs = int(sys.argv[1]), int(sys.argv[2])
    procs = [multiprocessing.Process(target=hog, args=(120,)) for _ in range(hogs)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    try:
        tps, ttft = asyncio.run(measure(port))
        print(f"hogs {hogs}: decode {tps:.1f} tok/s, ttft {ttft:.1f} ms")
    finally:
        for p in procs:
            p.terminate()
