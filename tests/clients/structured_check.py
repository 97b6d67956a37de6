"""Structured output as users get it: constrained generations checked by
independent validators (Python's `jsonschema` and `re`), and a tool-call round
trip with the official `openai` package.

    python3 tests/clients/structured_check.py PORT MODEL

Run by tests/constrained.rs against the real server. Each check prints
"ok: <what>"; any failure raises (exit status 1) with what differed.
"""
import asyncio
import json
import re
import sys

import jsonschema
import openai
import websockets

port, model = sys.argv[1], sys.argv[2]
ws_url = f"ws://127.0.0.1:{port}/"
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

# Objects, arrays, enums, numbers with bounds, required fields, nesting.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["knight", "wizard", "merchant"]},
        "active": {"type": "boolean"},
        "skills": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "skill": {"type": "string", "maxLength": 16},
                    "level": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["skill", "level"],
                "additionalProperties": False,
            },
        },
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "skills", "home"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
COLOURS = ["red", "green", "blue", "dark purple"]


def ok(what):
    print(f"ok: {what}", flush=True)


async def infer(ws, rid, prompt, params):
    """Sends one infer; returns (text, end or error message)."""
    await ws.send(json.dumps({"op": "infer", "id": rid, "prompt": prompt, "params": params}))
    text = ""
    while True:
        m = json.loads(await ws.recv())
        if m.get("id") != rid:
            continue
        if m["op"] == "token":
            text += m["content"]
        elif m["op"] in ("end", "error"):
            return text, m


async def infer_messages(ws, rid, messages, extra):
    await ws.send(json.dumps({"op": "infer", "id": rid, "messages": messages, **extra,
                              "params": {"temp": 0, "max_tokens": 16}}))
    text = ""
    while True:
        m = json.loads(await ws.recv())
        if m["op"] == "token":
            text += m["content"]
        elif m["op"] in ("end", "error"):
            return text, m


async def many(prompt, params, n=20, width=4):
    """n generations, `width` at a time on as many connections (a seed each)."""
    results = []

    async def worker(w):
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.recv()  # hello
            for i in range(w, n, width):
                results.append(await infer(ws, f"g{i}", prompt, {**params, "seed": 1000 + i}))

    await asyncio.gather(*(worker(w) for w in range(width)))
    return results


async def websocket_checks():
    base = {"temp": 1.0, "max_tokens": 300}
    outs = await many("A character sheet for a fantasy game, as JSON:\n", {**base, "json_schema": PERSON})
    for text, end in outs:
        assert end["op"] == "end" and end["reason"] == "eos", (text, end)
        jsonschema.validate(json.loads(text), PERSON)
    ok(f"20 generations at temperature 1.0 parse and validate against a nested schema (e.g. {outs[0][0]})")

    outs = await many("Call us at ", {**base, "regex": PHONE})
    for text, end in outs:
        assert end["reason"] == "eos" and re.fullmatch(PHONE, text), (text, end)
    ok(f"20 generations match the regex (e.g. {outs[0][0]!r})")

    outs = await many("My favourite colour is", {**base, "choice": COLOURS})
    for text, end in outs:
        assert end["reason"] == "eos" and text in COLOURS, (text, end)
    ok(f"20 generations are one of the choices ({sorted({t for t, _ in outs})})")

    grammar = 'start: "The answer is " ANSWER "."\nANSWER: /(yes|no)/'
    outs = await many("Question: is water wet?\n", {**base, "grammar": grammar}, n=4)
    for text, end in outs:
        assert re.fullmatch(r"The answer is (yes|no)\.", text), (text, end)
    ok("a Lark grammar is followed")

    gbnf = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no"'
    outs = await many("Question: is water wet?\n", {**base, "grammar": gbnf}, n=4)
    for text, end in outs:
        assert end["reason"] == "eos" and re.fullmatch(r"The answer is (yes|no)\.", text), (text, end)
    ok("a GBNF grammar (llama.cpp's sampler) is followed")

    async with websockets.connect(ws_url) as ws:
        await ws.recv()
        # Bad input: each a clear bad_request, before any token; the
        # connection goes on.
        cases = [
            ({"json_schema": {"type": "no-such-type"}}, "invalid JSON schema"),
            ({"json_schema": "a string"}, "params.json_schema must be a JSON schema"),
            ({"regex": "([a-z]"}, "invalid regex"),
            ({"grammar": "start: item\nitem: other"}, "invalid grammar"),
            ({"grammar": 'root ::= root "a"'}, "left recursion"),
            ({"grammar": 'item ::= "a"'}, "root"),
            ({"regex": "[^\\s\\S]"}, "matches no text"),
            ({"grammar": "start: A\nA: /a+/ & /b+/"}, "matches no text"),
            ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 3}}, "Unsatisfiable"),
            ({"choice": []}, "params.choice"),
            ({"regex": "a", "choice": ["a"]}, "both constraints"),
            ({"json_schema": {"enum": ["x" * 40] * 2000}}, "at most 65536"),
            ({"grammar": "root ::= " + " | ".join(['"%s"' % ("y" * 60)] * 1200)}, "at most 65536"),
            ({"logit_bias": {"999999999": 1}}, "vocabulary has"),
            ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ]
        for params, needle in cases:
            text, m = await infer(ws, "bad", "x", params)
            assert text == "" and m["op"] == "error" and m["code"] == "bad_request", (params, m)
            assert needle in m["message"], (needle, m)
        text, end = await infer(ws, "after", "The capital of France is", {"temp": 0, "max_tokens": 4})
        assert end["op"] == "end" and text, end
        ok("bad constraints are refused with a reason, and the connection goes on")

        # Log-probabilities on protocol v1; logit_bias bans a token.
        await ws.send(json.dumps({"op": "infer", "id": "lp", "prompt": "The capital of France is",
                                  "params": {"temp": 0, "max_tokens": 3, "logprobs": 2}}))
        tokens = []
        while True:
            m = json.loads(await ws.recv())
            if m["op"] == "token":
                tokens.append(m)
            elif m["op"] == "end":
                break
        first = tokens[0]["logprobs"]
        assert len(first["top"]) == 2 and first["token"] == first["top"][0]["token"], first
        text, _ = await infer(ws, "ban", "The capital of France is",
                              {"temp": 0, "max_tokens": 3, "logit_bias": [[first["token"], -100]]})
        assert not text.startswith(first["text"]), (text, first)
        ok("token logprobs on protocol v1, and logit_bias bans the greedy pick")

        # The samplers people tune, together, on a real model.
        text, end = await infer(ws, "tuned", "Once upon a time", {
            "temp": 1.0, "seed": 7, "max_tokens": 24, "typical_p": 0.9, "xtc_probability": 0.5,
            "xtc_threshold": 0.1, "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
            "min_tokens": 8, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repeat_penalty": 1.1})
        assert end["op"] == "end" and end["stats"]["completion_tokens"] >= 8, end
        stop_id = first["token"]
        text, end = await infer(ws, "stopid", "The capital of France is",
                                {"temp": 0, "max_tokens": 8, "stop_token_ids": [stop_id]})
        assert end["reason"] == "stop" and text == "", (text, end)
        ok("typical-p, XTC, DRY, min_tokens and penalties together; a stop token id ends the reply")

        # Tools on protocol v1: the same JSON, the calls in `end`.
        tool = {"name": "set_alarm", "description": "Sets an alarm",
                "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                               "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
                               "required": ["hour", "minute"], "additionalProperties": False}}
        messages = [{"role": "user", "content": "Wake me up at half past seven."}]
        await ws.send(json.dumps({"op": "infer", "id": "t1", "messages": messages, "tools": [tool],
                                  "tool_choice": "required", "params": {"temp": 1.0, "seed": 5}}))
        while True:
            m = json.loads(await ws.recv())
            if m["op"] in ("end", "error"):
                break
        assert m["op"] == "end" and m["reason"] == "tool_calls", m
        call = m["tool_calls"][0]
        assert call["name"] == "set_alarm" and call["id"], call
        jsonschema.validate(call["arguments"], tool["parameters"])
        messages += [{"role": "assistant", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "alarm set"}]
        text, end = await infer_messages(ws, "t2", messages, {"tools": [tool], "tool_choice": "none"})
        assert end["op"] == "end" and "tool_calls" not in end and end["stats"]["prompt_tokens"] > 40, end
        text, end = await infer_messages(ws, "t3", messages[:1], {"tools": [tool], "tool_choice": {"name": "nope"}})
        assert end["op"] == "error" and "nope" in end["message"], end
        ok(f"tools on protocol v1: a required call validates ({call['arguments']}) and its result renders")


def openai_checks():
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    # Forced call: the arguments always parse and validate.
    r = client.chat.completions.create(model=model, messages=messages, tools=[weather],
                                       tool_choice="required", temperature=1.0, max_tokens=120, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, r
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather", call
    jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])
    ok(f"a required tool call parses and validates: {call.function.arguments}")

    # The call and its result go back in the history; the next turn renders.
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "temp": 21})})
    r2 = client.chat.completions.create(model=model, messages=messages, tools=[weather], tool_choice="none",
                                        temperature=0, max_tokens=24)
    alone = client.chat.completions.create(model=model, messages=messages[:1], max_tokens=1)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls, r2
    # The call and the result (its JSON) are in the prompt.
    assert r2.usage.prompt_tokens > alone.usage.prompt_tokens + 20, (r2.usage, alone.usage)
    ok("the tool result goes back in the history and the next turn renders")

    # A named function, streamed as a tool_calls delta.
    stream = client.chat.completions.create(
        model=model, messages=messages[:1], tools=[weather], stream=True, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and calls[0].id, deltas
    json.loads("".join(tc.function.arguments for tc in calls))
    assert deltas[-1].finish_reason == "tool_calls", deltas[-1]
    ok("a named tool call streams as tool_calls deltas")

    # auto: a call or an answer, either way well-formed.
    r = client.chat.completions.create(model=model, messages=messages[:1], tools=[weather],
                                       temperature=0, max_tokens=120)
    c = r.choices[0]
    assert (c.finish_reason == "tool_calls" and c.message.tool_calls) or (c.message.content is not None), r
    ok(f"tool_choice auto answers with {c.finish_reason}")

    # response_format json_schema and json_object.
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
              "population": {"type": "integer", "minimum": 0, "maximum": 100000000}}, "required": ["city", "population"],
              "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Name a big city and its population."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": schema}},
            temperature=1.0, seed=seed, max_tokens=80)
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Any JSON object."}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict), r
    ok("response_format json_schema validates; json_object is an object")

    # Bad input: each a 400 naming the field.
    bad = [
        ({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [weather], "response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, None),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ]
    for extra, param in bad:
        body = {"model": model, "messages": messages[:1], **extra}
        try:
            client.chat.completions.create(**body)
        except openai.BadRequestError as e:
            assert param is None or e.body.get("param") == param, (extra, e.body)
        else:
            raise AssertionError(f"accepted: {extra}")
    ok("conflicting tool_choice, a bad schema and a stray tool message are 400s")


asyncio.run(websocket_checks())
openai_checks()
print("all ok")
