#!/usr/bin/env python3
"""Streams one completion from inference-core and prints it as it arrives.

    python3 -m pip install websockets
    python3 client.py [--url ws://127.0.0.1:8080/] [--max-tokens 64] [--temp 0.8] "The capital of France is"

Tokens go to stdout the moment they arrive; the end stats go to stderr.
Exit status: 0 when the request ended, 1 on an error event or a lost connection.
"""

import argparse
import asyncio
import json
import signal
import sys

import websockets


async def run(url: str, prompt: str, params: dict) -> int:
    request_id = "r1"
    async with websockets.connect(url) as ws:
        # Ctrl+C aborts the request; the server answers with `end` reason `abort`.
        abort = {"op": "abort", "id": request_id}
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGINT, lambda: asyncio.ensure_future(ws.send(json.dumps(abort)))
        )
        async for frame in ws:
            ev = json.loads(frame)
            op = ev.get("op")
            if op == "hello":
                print(
                    f"connected: model {ev['model']}, n_ctx {ev['n_ctx']}, server {ev['version']}",
                    file=sys.stderr,
                )
                infer = {"op": "infer", "id": request_id, "prompt": prompt, "params": params}
                await ws.send(json.dumps(infer))
            elif op == "token":
                print(ev["content"], end="", flush=True)
            elif op == "end":
                s = ev["stats"]
                print()
                print(
                    f"[end: {ev['reason']}; {s['prompt_tokens']} prompt + "
                    f"{s['completion_tokens']} completion tokens, ttft {s['ttft_ms']:.1f} ms, "
                    f"{s['tps']:.1f} tok/s, {s['ms']:.1f} ms]",
                    file=sys.stderr,
                )
                return 0
            elif op == "error":
                print(f"error {ev['code']}: {ev['message']}", file=sys.stderr)
                return 1
    print("connection closed before the request ended", file=sys.stderr)
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8080/")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("prompt", nargs="+", help="the text to continue")
    args = ap.parse_args()
    params = {"temp": args.temp, "max_tokens": args.max_tokens}
    try:
        return asyncio.run(run(args.url, " ".join(args.prompt), params))
    except (OSError, websockets.exceptions.WebSocketException) as e:
        print(f"cannot talk to {args.url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
