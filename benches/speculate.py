"""Speculative decoding on copy-heavy single streams, ours against llama-server.

    python3 benches/speculate.py          # BENCH_QUICK=1: one run each, for CI's smoke

(The smoke starts llama-server once, with its n-gram speculation: enough to
keep that side working.)

Starts, one after the other and never side by side, all alike (-t 2, -np 4,
-c 4096, llama-server with --kv-unified):
  ours, plain        scheduler.draft_max = 0
  ours               the defaults (draft lookup in the request's own text)
  llama-server       plain
  llama-server       --spec-type ngram-simple (its n-gram speculation, defaults)
  llama-server       --spec-type ngram-simple, lookup n-gram 3 (its size-n shortened to ours)
Each is sent, one at a time, greedy requests (ignore_eos) for each prompt: a
paragraph to copy, code to copy, and a story with nothing to copy (where
speculation must not cost anything). Decode rate, read at the client: the
tokens after the first over the time from the first to the end. Prints the
medians per prompt, the ratios, and whether our greedy text with drafts is
the plain one. Needs websockets.
"""
import asyncio, http.client, json, os, statistics, sys, tempfile, time

import websockets

from servers import QUICK, start_llama_server, start_ours, stop

RUNS, N = (1, 96) if QUICK else (5, 192)

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
             "cloth for the great lens. From the gallery he could see the fishing boats returning to the harbour, "
             "their lamps swinging with the swell, and beyond them the dark line of the northern cliffs where the "
             "gulls nested in spring. He kept a log of every ship that passed, the direction of the wind, and the "
             "height of the waves, and on quiet nights he read the old entries written by the keepers before him.")
CODE = '''def merge_intervals(intervals):
    """Merge overlapping intervals and return them sorted by start."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]
'''
PROMPTS = {
    "copy a paragraph": f"Text: The cat sat on the mat.\nCopy: The cat sat on the mat.\n\nText: {PARAGRAPH}\nCopy:",
    "copy code": f"# intervals.py\n{CODE}\n\n# intervals_backup.py (an exact copy of intervals.py)\n",
    "story (nothing to copy)": "Once upon a time, in a village by the sea,",
}


async def ours(port):
    out = {}
    async with websockets.connect(f"ws://127.0.0.1:{port}/", max_size=None) as ws:
        await ws.recv()
        for name, prompt in PROMPTS.items():
            rates, texts, accepted = [], [], 0
            for i in range(RUNS + 1):
                params = {"temp": 0, "max_tokens": N, "ignore_eos": True}
                await ws.send(json.dumps({"op": "infer", "id": f"r{i}", "prompt": prompt, "params": params}))
                text, first = "", None
                while True:
                    m = json.loads(await ws.recv())
                    if m["op"] == "token":
                        first = first or time.perf_counter()
                        text += m["content"]
                    if m["op"] in ("end", "error"):
                        end = time.perf_counter()
                        break
                if i > 0:
                    rates.append((m["stats"]["completion_tokens"] - 1) / (end - first))
                    accepted += m["stats"]["draft_accepted"]
                texts.append(text)
            out[name] = (statistics.median(rates), texts[-1], accepted / RUNS)
    return out


def theirs(port):
    out = {}
    for name, prompt in PROMPTS.items():
        rates = []
        for i in range(RUNS + 1):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            body = {"prompt": prompt, "n_predict": N, "temperature": 0, "stream": True, "ignore_eos": True,
                    "cache_prompt": False}
            c.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            first, n = None, 0
            for line in c.getresponse():
                if not line.startswith(b"data: "):
                    continue
                m = json.loads(line[6:])
                if m.get("content"):
                    first = first or time.perf_counter()
                if m.get("stop"):
                    n = m.get("tokens_predicted", N)
            end = time.perf_counter()
            c.close()
            if i > 0:
                rates.append((n - 1) / (end - first))
        out[name] = statistics.median(rates)
    return out


def main():
    results = {}
    for label, toml in (("ours, plain", "[scheduler]\ndraft_max = 0\n"), ("ours", "")):
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(toml + ("" if toml else "[scheduler]\n") + "prefix_cache_entries = 0\n")
        p, port = start_ours(["-t", "2", "--parallel", "4", "--config", f.name])
        try:
            results[label] = asyncio.run(ours(port))
        finally:
            stop(p)
            os.unlink(f.name)
    llama = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target/llama-tools/bin/llama-server")
    refs = (("llama-server, plain", ()),
            ("llama-server, ngram-simple", ("--spec-type", "ngram-simple")),
            ("llama-server, ngram-simple n=3", ("--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3")))
    if QUICK:
        refs = refs[1:2]
    if os.path.exists(llama):
        for label, extra in refs:
            p, port = start_llama_server(extra=extra)
            try:
                results[label] = theirs(port)
            finally:
                stop(p)
    else:
        print("no llama-server (benches/llama-tools.sh llama-server): our side only", file=sys.stderr)
    rate = lambda label, name: results[label][name][0] if label.startswith("ours") else results[label][name]
    for name in PROMPTS:
        plain = rate("ours, plain", name)
        line = [f"{name}: ours {rate('ours', name):.1f} tok/s = {rate('ours', name) / plain:.2f}x our plain "
                f"({plain:.1f}; {results['ours'][name][2]:.0f} draft tokens kept a request)"]
        for label, _ in refs:
            if label in results:
                line.append(f"{label} {rate(label, name):.1f} (ours {rate('ours', name) / rate(label, name):.2f}x)")
        same = results["ours"][name][1] == results["ours, plain"][name][1]
        line.append(f"greedy text with drafts {'is' if same else 'IS NOT'} the plain one")
        print("; ".join(line))
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
