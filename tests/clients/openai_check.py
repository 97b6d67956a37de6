"""Drives the OpenAI API with the official `openai` package, as users' code does.

    python3 tests/clients/openai_check.py BASE_URL MODEL [API_KEY]

Run by tests/openai.rs against the real server. Each check prints "ok: <what>";
any failure raises (exit status 1) with what differed.
"""
import sys

import openai

try:  # the HTTP client the openai package is built on (httpx2 from openai 3)
    import httpx2 as httpx
except ImportError:
    import httpx

base, model = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "unused"

# One pooled connection, its local port noted per response: keep-alive must
# let the client reuse it.
ports = []
http = httpx.Client(
    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    event_hooks={
        "response": [lambda r: ports.append(r.extensions["network_stream"].get_extra_info("client_addr")[1])]
    },
)
client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, http_client=http, max_retries=0)


def ok(what):
    print(f"ok: {what}", flush=True)


# Models.
models = client.models.list()
assert [m.id for m in models.data] == [model], models
ok("models.list names the model")

# Chat, not streamed.
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
    max_tokens=8,
    temperature=0,
    seed=1,
)
choice = chat.choices[0]
assert choice.message.role == "assistant" and choice.message.content, chat
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 8, chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
assert chat.model == model and chat.object == "chat.completion"
ok("chat completion with usage")

# The same request streamed: the same text, piece by piece (greedy).
pieces, finish, usage = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert len(pieces) >= 2, pieces
assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
assert finish == choice.finish_reason and usage.completion_tokens == chat.usage.completion_tokens
# The system prompt and turn were cached by the first request.
assert usage.prompt_tokens_details.cached_tokens > 0, usage
ok("streamed chat matches, usage chunk, cached prompt tokens")

# Legacy completions, with log-probabilities.
comp = client.completions.create(model=model, prompt="The sky is", max_tokens=4, temperature=0, logprobs=3)
lp = comp.choices[0].logprobs
assert len(lp.tokens) == comp.usage.completion_tokens == len(lp.token_logprobs), lp
assert all(len(t) == 3 for t in lp.top_logprobs), lp.top_logprobs
# Greedy: each chosen token is the most likely one.
for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert abs(max(top.values()) - p) < 1e-3 and p <= 0, (tok, p, top)
assert "".join(lp.tokens) == comp.choices[0].text
ok("completions with logprobs")

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=3, temperature=0,
    logprobs=True, top_logprobs=2,
)
content = chat.choices[0].logprobs.content
assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
assert all(bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content if c.bytes)
ok("chat logprobs with top_logprobs")

# Penalties and stop are accepted.
chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count: 1, 2, 3,"}], max_tokens=6,
    presence_penalty=0.5, frequency_penalty=0.5, stop=["\n"], temperature=0.7, top_p=0.9,
)
assert "\n" not in chat.choices[0].message.content
ok("penalties and stop")

# Errors come as the package's own exception types.
try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body
ok("unknown model is NotFoundError")
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=5)
    raise AssertionError("temperature 5 accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body
ok("bad parameter is BadRequestError naming it")
try:
    client.completions.create(model=model, prompt="x " * 5000, max_tokens=4)
    raise AssertionError("context overflow accepted")
except openai.BadRequestError as e:
    assert e.body["code"] == "context_overflow" and "4096" in e.body["message"], e.body
ok("context overflow is BadRequestError naming both sizes")
try:
    for _ in client.chat.completions.create(model=model, messages=[], stream=True):
        pass
    raise AssertionError("empty messages accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "messages", e.body
ok("a bad streamed request is BadRequestError before any event")

# Every request above went over one pooled keep-alive connection.
# (A 4xx answer keeps it too. The package closes a streamed response at
# [DONE] without reading the chunked body's last bytes, so its connection is
# dropped by the client: one more connection after the first stream.)
assert len(ports) >= 9 and len(set(ports)) <= 2 and ports[3:] == [ports[3]] * len(ports[3:]), ports
ok(f"{len(ports)} requests reused one keep-alive connection")

if key != "unused":
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    ok("a wrong key is AuthenticationError")
print("all ok")
