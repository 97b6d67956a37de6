"""Short interactive requests beside a long prompt, ours against llama-server.

    python3 benches/short_beside_long.py ours PORT      # a running inference-core (WebSocket)
    python3 benches/short_beside_long.py theirs PORT    # a running llama-server (POST /completion)

Each round starts a ~1400-token prompt (64 tokens out), then 150 ms later three
short prompts (16 tokens out) at once; 6 rounds, the first a warm-up. Prints the
short requests' TTFT p50 and inter-token gaps (p50, p99) and the long one's TTFT,
in seconds. Start both servers alike (-t 2, 4 slots, -c 4096; llama-server with
--kv-unified) and run them one after the other, never side by side. Needs
websockets and httpx2 (the openai package's HTTP client).
"""
import asyncio, json, time, statistics, sys, websockets, httpx2
LONG = "Rule: " + " ".join(f"item {i} is the {i*7%13}th of its kind." for i in range(120))
SHORT = "The capital of France is"
async def ours_req(port, prompt, n):
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.recv()
        t0 = time.time()
        await ws.send(json.dumps({"op":"infer","id":"r","prompt":prompt,"params":{"temp":0,"max_tokens":n,"ignore_eos":True}}))
        first=None; gaps=[]; last=None
        while True:
            m = json.loads(await ws.recv())
            if m["op"]=="token":
                now=time.time()
                if first is None: first=now-t0
                else: gaps.append(now-last)
                last=now
            elif m["op"] in ("end","error"): return first, gaps, m
async def theirs_req(port, prompt, n):
    async with httpx2.AsyncClient(timeout=120) as s:
        t0=time.time()
        async with s.stream("POST", f"http://127.0.0.1:{port}/completion", json={"prompt":prompt,"n_predict":n,"temperature":0,"stream":True,"ignore_eos":True,"cache_prompt":False}) as r:
            first=None; gaps=[]; last=None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    d=json.loads(line[6:])
                    now=time.time()
                    if d.get("content"):
                        if first is None: first=now-t0
                        else: gaps.append(now-last)
                        last=now
                    if d.get("stop"): return first, gaps, d
async def round_(fn, port, i):
    long_task = asyncio.create_task(fn(port, f"{i} {LONG}", 64))
    await asyncio.sleep(0.15)
    shorts = await asyncio.gather(*[fn(port, f"{SHORT} {i}-{k}", 16) for k in range(3)])
    lt = await long_task
    return [s[0] for s in shorts], [g for s in shorts for g in s[1]], lt[0]
async def main(kind, port):
    fn = ours_req if kind=="ours" else theirs_req
    ttft=[]; gaps=[]; lts=[]
    for i in range(6):
        t, g, l = await round_(fn, port, i)
        if i>0: ttft+=t; gaps+=g; lts.append(l)
    gaps.sort()
    print(json.dumps({"kind":kind,"short_ttft_p50":statistics.median(ttft),"short_itl_p99":gaps[int(len(gaps)*0.99)],"short_itl_p50":statistics.median(gaps),"long_ttft_p50":statistics.median(lts)}))
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
