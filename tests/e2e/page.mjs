// Drives the page at GET / in Debian's headless Chromium, as a person would:
// a streamed prompt, an error, a two-turn chat, an abort, an OpenAI API stream
// read with fetch(), then a lost server,
// and a (mocked) later server that answers {"op":"status"}.
//
//   node tests/e2e/page.mjs PORT SCREENSHOT.png
//
// Run by tests/page.rs, which starts the server and, when this prints the line
// STOP_SERVER, stops it (SIGTERM) so the page's disconnect banner can be checked.
// Writes SCREENSHOT.png (desktop, after the abort) and SCREENSHOT-phone.png
// (phone-sized, with the banner). Exits 0 when every check passed.
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const [port, shot] = process.argv.slice(2);
if (!port || !shot) {
  console.error("usage: node tests/e2e/page.mjs PORT SCREENSHOT.png");
  process.exit(2);
}
setTimeout(() => {
  console.error("page.mjs: gave up after 120 s");
  process.exit(1);
}, 120_000).unref();

const step = (what) => console.log(`page.mjs: ${what}`);

// Debian's Chromium, never a downloaded one. playwright-core gives it a new
// empty profile (its own --user-data-dir) on every launch.
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 820 } });
  page.setDefaultTimeout(30_000);
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  const sent = []; // every frame the page sends, parsed
  page.on("websocket", (ws) => ws.on("framesent", (f) => sent.push(JSON.parse(f.payload))));

  // Every token event appended to an output span is one DOM mutation: counting
  // them tells streamed text from text that arrived in one piece.
  await page.addInitScript(() => {
    window.__appends = 0;
    new MutationObserver((ms) => {
      for (const m of ms) if (m.target.classList?.contains("out")) window.__appends += m.addedNodes.length;
    }).observe(document, { childList: true, subtree: true });
  });

  const pageHtml = await (await page.goto(`http://127.0.0.1:${port}/`)).text();
  await page.locator("#server", { hasText: "gemma-3-270m-q4_k_m" }).waitFor();
  await page.locator("#send:enabled").waitFor();
  assert.match(await page.locator("#server").innerText(), /n_ctx\s*4096/);
  step("connected, hello shown");

  const turn = (id) => page.locator(`.turn[data-id="${id}"]`);
  const send = async (text, params) => {
    for (const [k, v] of Object.entries(params)) await page.fill(`#${k}`, String(v));
    await page.fill("#input", text);
    await page.click("#send");
  };

  // 1. A prompt streams, then ends with its stats.
  await send("The capital of France is", { temp: 0, max_tokens: 12 });
  await turn("r1").locator('.meta[data-state="done"]').waitFor();
  const meta1 = await turn("r1").locator(".meta").innerText();
  assert.match(meta1, /done \((length|eos)\)/);
  assert.match(meta1, /TTFT \d+ ms \(server \d+ ms\)/);
  assert.match(meta1, /[\d.]+ tok\/s/);
  const out1 = await turn("r1").locator(".out").innerText();
  assert.ok(out1.trim().length > 0, "no text streamed");
  const appends = await page.evaluate(() => window.__appends);
  assert.ok(appends >= 2, `text arrived in ${appends} piece(s), not streamed`);
  assert.deepEqual(sent.find((m) => m.op === "infer"),
    { op: "infer", id: "r1", params: { temp: 0, max_tokens: 12 }, prompt: "The capital of France is" });
  // The server answers {"op":"status"}: its slots and KV pages are shown.
  assert.ok(sent.filter((m) => m.op === "status").length >= 1);
  await page.locator("#server", { hasText: "kv pages" }).waitFor();
  assert.match(await page.locator("#server").innerText(), /slots \d+\/4 busy.*kv pages \d+ used, \d+ cached, \d+ free.*queued \d+/s);
  assert.ok(await page.locator("#notice").isHidden(), `a notice is shown: ${await page.locator("#notice").innerText()}`);
  step(`prompt streamed in ${appends} pieces: ${JSON.stringify(out1)}; ${meta1}`);

  // 2. An error event is shown on its request.
  await send("Hello", { temp: 500, max_tokens: 8 });
  await turn("r2").locator(".err", { hasText: "bad_request" }).waitFor();
  assert.match(await turn("r2").locator(".err").innerText(), /temp = 500 is out of range/);
  assert.equal(await turn("r2").locator(".meta").getAttribute("data-state"), "error");
  step("error event shown");

  // 3. Chat mode keeps the conversation.
  await page.check("#mode-chat");
  await send("Say hello.", { temp: 0, max_tokens: 8 });
  await turn("r3").locator('.meta[data-state="done"]').waitFor();
  await send("Once more, please.", { temp: 0, max_tokens: 8 });
  await turn("r4").locator('.meta[data-state="done"]').waitFor();
  const chat = sent.find((m) => m.id === "r4").messages;
  assert.deepEqual(chat.map((m) => m.role), ["user", "assistant", "user"]);
  assert.equal(chat[1].content, await turn("r3").locator(".out").innerText());
  assert.equal(await page.locator(".turn.user").count(), 2);
  step("chat kept its turns");

  // 4. A long request is aborted while it streams.
  await page.check("#mode-prompt");
  await page.check("#ignore_eos");
  await send("Once upon a time", { temp: 0.8, max_tokens: 4000 });
  await page.waitForFunction(() => document.querySelector('.turn[data-id="r5"] .out')?.textContent.length > 40);
  assert.ok(await page.locator("#send").isDisabled(), "send stays disabled while a request runs");
  await page.click("#abort");
  await turn("r5").locator('.meta[data-state="aborted"]').waitFor();
  assert.match(await turn("r5").locator(".meta").innerText(), /^aborted · \d+ tokens/);
  // The page also asks for {"op":"status"} every 5 s: one may follow the abort.
  assert.deepEqual(sent.filter((m) => m.op !== "status").at(-1), { op: "abort", id: "r5" });
  assert.ok(await page.locator("#send").isEnabled());
  await page.screenshot({ path: shot });
  step(`aborted; screenshot ${shot}`);

  // 5. The OpenAI API from the browser: fetch() reads the server-sent events
  //    as they come, in several reads, and [DONE] ends them.
  const sse = await page.evaluate(async () => {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: [{ role: "user", content: "Hi" }], max_tokens: 8,
        ignore_eos: true, temperature: 0, stream: true }),
    });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let text = "", reads = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      reads += 1;
      text += decoder.decode(value, { stream: true });
    }
    const data = text.split("\n\n").filter((e) => e.startsWith("data: ")).map((e) => e.slice(6));
    return { status: r.status, type: r.headers.get("content-type"), reads, data };
  });
  assert.equal(sse.status, 200);
  assert.equal(sse.type, "text/event-stream");
  assert.equal(sse.data.at(-1), "[DONE]");
  const deltas = sse.data.slice(0, -1).map((d) => JSON.parse(d).choices[0]?.delta?.content).filter(Boolean);
  assert.ok(deltas.length >= 4 && deltas.length <= 8, JSON.stringify(sse.data));
  assert.ok(sse.reads >= 2, `the stream arrived in ${sse.reads} read(s)`);
  step(`fetch() streamed ${deltas.length} tokens in ${sse.reads} reads`);

  // 5. The server goes away: a plain banner, then failed retries.
  assert.ok(await page.locator("#banner").isHidden());
  console.log("STOP_SERVER");
  await page.locator("#banner", { hasText: "Disconnected from" }).waitFor();
  await page.locator("#banner", { hasText: "Cannot connect to" }).waitFor();
  assert.ok(await page.locator("#send").isDisabled(), "send is disabled while offline");
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone screen`);
  const phone = shot.replace(/\.png$/, "") + "-phone.png";
  await page.screenshot({ path: phone });
  step(`banner shown; screenshot ${phone}`);

  // 6. A server whose status snapshot has other fields (mocked here)
  // gets its snapshot shown.
  const later = await browser.newPage();
  later.on("pageerror", (e) => pageErrors.push(String(e)));
  await later.routeWebSocket(/.*/, (ws) => {
    ws.onMessage((m) => {
      if (JSON.parse(m).op === "status") {
        ws.send(JSON.stringify({ op: "status", busy_slots: 1, queue: 2, temperature_c: 61 }));
      }
    });
    ws.send(JSON.stringify({ op: "hello", status: "ready", model: "mock", n_ctx: 512, version: "9.9.9" }));
  });
  await later.route("**/*", (r) => r.fulfill({ contentType: "text/html", body: pageHtml }));
  await later.goto(`http://127.0.0.1:${port}/`);
  await later.locator("#server", { hasText: "temperature_c" }).waitFor();
  assert.match(await later.locator("#server").innerText(), /model mock.*busy_slots 1.*queue 2.*temperature_c 61/s);
  step("a status snapshot is shown");

  assert.deepEqual(pageErrors, [], "the page threw");
} finally {
  await browser.close();
}
step("all checks passed");
