"""Two builds of our server against each other, in alternating rounds.

    python3 benches/ab.py OLD_BINARY NEW_BINARY [--clients 4] [--seconds 30] [--rounds 3]
    BENCH_QUICK=1 python3 benches/ab.py   # CI's smoke: this build against itself, briefly

A change worth a few percent is lost in this machine's drift when each build
is measured once (runs of one binary moved 10-20% within an hour). Here the
two builds take turns in A B B A order, round after round, each a fresh
server (-t 2 --parallel 8, no cached prefixes carried over) with N WebSocket
clients sending unique prompts back to back (greedy unless --temp, ignore_eos,
--max-tokens each). A round counts the tokens streamed in --seconds after a
--warmup. Prints each round's tokens, the ratio new / old of each A B pair and
their median, which is the figure to report. Extra server arguments go after
`--` (e.g. `-- --config my.toml`). Needs websockets.
"""
import argparse, asyncio, json, os, shutil, statistics, sys, time

import websockets

from servers import QUICK, ROOT, start_ours, stop


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", nargs="?", help="the A binary (default: target/release/inference-core)")
    p.add_argument("new", nargs="?", help="the B binary (default: the A one)")
    p.add_argument("--clients", type=int, default=2 if QUICK else 4)
    p.add_argument("--seconds", type=float, default=3 if QUICK else 30)
    p.add_argument("--warmup", type=float, default=2 if QUICK else 10)
    p.add_argument("--rounds", type=int, default=1 if QUICK else 3, help="A B pairs")
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=16 if QUICK else 96)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:split])
    a.server_args = argv[split + 1:]  # after --: passed to both servers
    a.old = a.old or os.path.join(ROOT, "target/release/inference-core")
    a.new = a.new or a.old
    return a


async def client(port, i, a, window, counts):
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.recv()  # hello
        k = 0
        while time.monotonic() < window[1]:
            k += 1
            prompt = f"Story {i}-{k}: once upon a time in the land of {i * 7 + k},"
            params = {"temp": a.temp, "max_tokens": a.max_tokens, "ignore_eos": True, "seed": k}
            await ws.send(json.dumps({"op": "infer", "id": f"r{k}", "prompt": prompt, "params": params}))
            while True:
                m = json.loads(await ws.recv())
                if m["op"] == "token" and window[0] <= time.monotonic() < window[1]:
                    counts[i] += 1
                if m["op"] == "error":
                    sys.exit(f"request r{k} of client {i}: {m}")
                if m["op"] == "end":
                    break


def measure(binary, a, state):
    p, port = start_ours(["-t", "2", "--parallel", "8", *a.server_args], state=state, binary=binary)
    try:
        t = time.monotonic()
        window, counts = (t + a.warmup, t + a.warmup + a.seconds), [0] * a.clients

        async def run():
            await asyncio.gather(*[client(port, i, a, window, counts) for i in range(a.clients)])

        asyncio.run(run())
        return sum(counts)
    finally:
        stop(p)


def main():
    a = parse()
    state = f"/tmp/ab-state-{os.getpid()}"
    ratios = []
    for r in range(a.rounds):
        order = [("A", a.old), ("B", a.new)] if r % 2 == 0 else [("B", a.new), ("A", a.old)]
        got = {}
        for name, binary in order:
            shutil.rmtree(state, ignore_errors=True)
            got[name] = measure(binary, a, state)
        if got["A"] == 0:
            sys.exit("A streamed no tokens")
        ratios.append(got["B"] / got["A"])
        print(f"round {r + 1}: A {got['A']} tokens, B {got['B']} tokens, B/A {ratios[-1]:.3f}", flush=True)
    shutil.rmtree(state, ignore_errors=True)
    print(f"B/A median {statistics.median(ratios):.3f} over {a.rounds} pair(s), "
          f"{a.clients} clients, {a.seconds:g} s each (A {a.old}, B {a.new})")


if __name__ == "__main__":
    main()
