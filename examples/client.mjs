#!/usr/bin/env node
// Streams one completion from inference-core and prints it as it arrives.
//
//   cd examples && npm ci
//   node client.mjs [--url ws://127.0.0.1:8080/] [--max-tokens 64] [--temp 0.8] "The capital of France is"
//
// Tokens go to stdout the moment they arrive; the end stats go to stderr.
// Exit status: 0 when the request ended, 1 on an error event or a lost connection.
import { parseArgs } from "node:util";
import WebSocket from "ws";

const { values: opt, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string", default: "ws://127.0.0.1:8080/" },
    "max-tokens": { type: "string", default: "64" },
    temp: { type: "string", default: "0.8" },
  },
});
const prompt = positionals.join(" ");
if (!prompt) {
  console.error("usage: node client.mjs [--url URL] [--max-tokens N] [--temp T] PROMPT");
  process.exit(2);
}

const id = "r1";
const ws = new WebSocket(opt.url);
let done = false;

ws.on("message", (data) => {
  const ev = JSON.parse(data.toString());
  switch (ev.op) {
    case "hello":
      console.error(`connected: model ${ev.model}, n_ctx ${ev.n_ctx}, server ${ev.version}`);
      ws.send(JSON.stringify({
        op: "infer",
        id,
        prompt,
        params: { temp: Number(opt.temp), max_tokens: Number(opt["max-tokens"]) },
      }));
      break;
    case "token":
      process.stdout.write(ev.content);
      break;
    case "end": {
      const s = ev.stats;
      process.stdout.write("\n");
      console.error(
        `[end: ${ev.reason}; ${s.prompt_tokens} prompt + ${s.completion_tokens} completion tokens, ` +
          `ttft ${s.ttft_ms.toFixed(1)} ms, ${s.tps.toFixed(1)} tok/s, ${s.ms.toFixed(1)} ms]`,
      );
      done = true;
      ws.close();
      break;
    }
    case "error":
      console.error(`error ${ev.code}: ${ev.message}`);
      process.exitCode = 1;
      done = true;
      ws.close();
      break;
  }
});

ws.on("error", (err) => {
  console.error(`cannot talk to ${opt.url}: ${err.message}`);
  process.exitCode = 1;
  done = true;
});

ws.on("close", (code, reason) => {
  if (!done) {
    console.error(`connection closed before the request ended (${code} ${reason})`);
    process.exitCode = 1;
  }
});

// Ctrl+C aborts the request; the server answers with `end` reason `abort`.
process.on("SIGINT", () => {
  if (done || ws.readyState !== WebSocket.OPEN) process.exit(130);
  ws.send(JSON.stringify({ op: "abort", id }));
});
