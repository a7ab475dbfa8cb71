// keyrelay in a real browser: headless Chromium loads pages from local
// origins and calls a real keyrelay process, which forwards to a mock Baseten
// that demands the key. The cases prove the frontend story end to end:
// allowed pages stream token by token (fetch, SSE over fetch, WebSocket) with
// the key added by keyrelay, and can read why a request was refused; other
// origins and DNS-rebinding pages are refused before anything is forwarded;
// the key never reaches the browser; the origin rules dev servers need (port
// wildcard, credentials, Timing-Allow-Origin); and `keyrelay demo`'s page.
// Run by run.sh; each case is bounded in time.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Witness, launchBrowser, startPageServer } from './lib/browser.mjs';
import { startDemo, startKeyrelay } from './lib/processes.mjs';
import { startUpstream } from './lib/upstream.mjs';

const CASE = { timeout: 15_000 };
const SETUP = { timeout: 45_000 };
const OUT_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'out');
const KEY = randomBytes(24).toString('base64url');
const ANSWER = 'The mistral is a strong, cold northwesterly wind that blows from southern France into the Gulf of Lion.';
const DEMO_ANSWER_START = 'The mistral is a strong, cold northwesterly wind';
// Characters of 2 to 4 bytes in UTF-8: the page must decode across chunks.
const DEMO_ANSWER_END = 'in Chinese it is 密史脱拉风. It empties café terraces, €4 espresso and all 💨';

const witness = new Witness();
let upstream, pages, browser, keyrelay;
let allowed, disallowed; // the same page server under two origins: only the first is allowed

before(async () => {
  upstream = await startUpstream({ key: KEY, answer: ANSWER });
  pages = await startPageServer();
  allowed = `http://localhost:${pages.port}`;
  disallowed = `http://127.0.0.1:${pages.port}`;
  keyrelay = await startKeyrelay({
    key: KEY,
    upstream: upstream.url,
    origins: [allowed],
    env: { KEYRELAY_ALLOWED_PATHS: 'POST /production/predict,POST /v1/chat/completions,GET /v1/websocket' },
  });
  browser = await launchBrowser({ witness, onPageText: (text) => upstream.pageSaw(text) });
}, SETUP);

after(async () => {
  await browser?.close();
  await keyrelay?.stop();
  await pages?.close();
  await upstream?.close();
}, SETUP);

// ---- code run in the page (page.evaluate serializes these functions) ----

/** POST a streaming predict and read it with getReader(), reporting each piece. */
async function streamPredict(url) {
  const response = await fetch(url, { method: 'POST', body: JSON.stringify({ prompt: 'Mistral?', stream: true }) });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = '';
  let reads = 0;
  for (let r = await reader.read(); !r.done; r = await reader.read()) {
    reads += 1;
    text += r.value;
    await window.reportText(r.value);
  }
  return { status: response.status, text, reads };
}

/** POST an OpenAI-style streaming chat (JSON, so preflighted) and parse its SSE from fetch. */
async function streamChat(url) {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'mock', stream: true, messages: [{ role: 'user', content: 'Mistral?' }] }),
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let text = '';
  let events = 0;
  let sawDone = false;
  for (let r = await reader.read(); !r.done; r = await reader.read()) {
    buffer += r.value;
    for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
      const data = buffer.slice(0, end).replace(/^data: ?/gm, '');
      buffer = buffer.slice(end + 2);
      if (data === '[DONE]') {
        sawDone = true;
        continue;
      }
      const delta = JSON.parse(data).choices[0].delta.content ?? '';
      events += 1;
      text += delta;
      await window.reportText(delta);
    }
  }
  return { status: response.status, contentType: response.headers.get('content-type'), text, events, sawDone };
}

/** Opens a WebSocket, sends one message, and resolves with the reply (or how it closed). */
function echoOverWebSocket(url) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.onopen = () => ws.send('hello through keyrelay');
    ws.onmessage = (event) => {
      resolve({ opened: true, reply: event.data });
      ws.close();
    };
    ws.onclose = (event) => resolve({ opened: false, closeCode: event.code });
  });
}

/** fetch(url, init) as the page sees it: status and body, or the error's text. */
async function tryFetch([url, init]) {
  try {
    const response = await fetch(url, init);
    return { status: response.status, body: await response.text() };
  } catch (error) {
    return { error: `${error.name}: ${error.message}` };
  }
}

const PREDICT = { method: 'POST', body: '{"stream": false}' }; // text/plain: a "simple" request
const PREDICT_JSON = { ...PREDICT, headers: { 'content-type': 'application/json' } }; // preflighted

// ---- the cases ----

/** When the case ends with its stream unread (a timeout: keyrelay held tokens back), says how far it got. */
function explainStall(t) {
  t.signal.addEventListener('abort', () => upstream.stall() && t.diagnostic(upstream.stall()));
}

const FAILED_FETCH = { error: 'TypeError: Failed to fetch' }; // what CORS leaves a page

test('allowed origin streams by fetch + getReader(), one token at a time (lockstep)', CASE, async (t) => {
  explainStall(t);
  const { page } = await browser.open(t, allowed);
  const mark = upstream.mark();
  const result = await page.evaluate(streamPredict, `${keyrelay.url}/production/predict`);
  witness.add('streamed texts', result.text);
  assert.equal(result.status, 200);
  assert.equal(result.text, ANSWER);
  assert.ok(result.reads >= upstream.tokens.length, `${result.reads} reads for ${upstream.tokens.length} tokens`);
  const forwarded = upstream.since(mark);
  assert.deepEqual(forwarded.map((r) => `${r.method} ${r.path}`), ['POST /production/predict']);
  assert.equal(forwarded[0].headers.authorization, `Api-Key ${KEY}`, 'keyrelay added the key');
});

test('allowed origin parses SSE from a preflighted fetch; preflight answered 204 by keyrelay, never forwarded', CASE, async (t) => {
  explainStall(t);
  const { page, network } = await browser.open(t, allowed);
  const url = `${keyrelay.url}/v1/chat/completions`;
  const mark = upstream.mark();
  const result = await page.evaluate(streamChat, url);
  witness.add('streamed texts', result.text);
  assert.equal(result.status, 200);
  assert.match(result.contentType, /^text\/event-stream/);
  assert.equal(result.text, ANSWER);
  assert.equal(result.events, upstream.tokens.length);
  assert.ok(result.sawDone, 'the stream ended with data: [DONE]');
  assert.equal((await network.one({ type: 'Preflight', url })).status, 204);
  assert.deepEqual(
    upstream.since(mark).map((r) => `${r.method} ${r.path}`),
    ['POST /v1/chat/completions'],
    'only the POST reached the upstream, no OPTIONS',
  );
});

test('browser WebSocket through keyrelay: echo works, key added on the upgrade', CASE, async (t) => {
  const { page, network } = await browser.open(t, allowed);
  const url = `${keyrelay.url.replace('http:', 'ws:')}/v1/websocket`;
  const mark = upstream.mark();
  const result = await page.evaluate(echoOverWebSocket, url);
  assert.deepEqual(result, { opened: true, reply: 'hello through keyrelay' });
  const socket = await network.one({ type: 'WebSocket', url });
  assert.equal(socket.status, 101);
  assert.equal(socket.requestHeaders.authorization, undefined, 'the browser sent no Authorization');
  const [upgrade] = upstream.since(mark);
  assert.equal(upgrade.headers.upgrade, 'websocket');
  assert.equal(upgrade.headers.authorization, `Api-Key ${KEY}`, 'keyrelay added the key to the upgrade');
});

test('disallowed origin (127.0.0.1 vs localhost, exact match): simple fetch, preflight and WebSocket get 403, nothing forwarded', CASE, async (t) => {
  const { page, network } = await browser.open(t, disallowed);
  const simple = `${keyrelay.url}/production/predict?probe=simple`;
  const preflighted = `${keyrelay.url}/production/predict?probe=preflighted`;
  const socketUrl = `${keyrelay.url.replace('http:', 'ws:')}/v1/websocket`;
  const mark = upstream.mark();

  assert.deepEqual(await page.evaluate(tryFetch, [simple, PREDICT]), FAILED_FETCH);
  assert.equal((await network.one({ type: 'Fetch', url: simple })).status, 403);
  assert.equal(network.find({ type: 'Preflight', url: simple }).length, 0, 'a simple request, not preflighted');

  assert.deepEqual(await page.evaluate(tryFetch, [preflighted, PREDICT_JSON]), FAILED_FETCH);
  assert.equal((await network.one({ type: 'Preflight', url: preflighted })).status, 403);
  assert.equal((await network.one({ type: 'Fetch', url: preflighted })).status, undefined, 'the POST itself was never sent');

  assert.deepEqual(await page.evaluate(echoOverWebSocket, socketUrl), { opened: false, closeCode: 1006 });
  const socket = await network.one({ type: 'WebSocket', url: socketUrl });
  assert.match(socket.error, /Unexpected response code: 403/);

  assert.deepEqual(upstream.since(mark), [], 'the upstream received nothing');
});

test('allowed origin can read why keyrelay refused it (path_not_allowed), nothing forwarded', CASE, async (t) => {
  const { page } = await browser.open(t, allowed);
  const mark = upstream.mark();
  const result = await page.evaluate(tryFetch, [`${keyrelay.url}/v1/models`, { method: 'GET' }]);
  assert.equal(result.status, 403, JSON.stringify(result));
  assert.equal(JSON.parse(result.body).type, 'path_not_allowed');
  assert.deepEqual(upstream.since(mark), [], 'the upstream received nothing');
});

test('DNS rebinding: a page on attacker.test (resolving to 127.0.0.1) gets 403 host_not_allowed', CASE, async (t) => {
  const attacker = `http://attacker.test:${keyrelay.port}`;
  const mark = upstream.mark();
  const { page, response } = await browser.open(t, `${attacker}/`);
  assert.equal(response.status(), 403, 'the page itself was refused');
  // Same-origin from the browser's view, so the page may read the refusal.
  const result = await page.evaluate(tryFetch, ['/production/predict', PREDICT]);
  assert.equal(result.status, 403);
  assert.equal(JSON.parse(result.body).type, 'host_not_allowed');
  assert.deepEqual(upstream.since(mark), [], 'the upstream received nothing');
});

test('Timing-Allow-Origin: the page can read keyrelay\'s Server-Timing', CASE, async (t) => {
  const { page, network } = await browser.open(t, allowed);
  const url = `${keyrelay.url}/production/predict?probe=timing`;
  assert.equal((await page.evaluate(tryFetch, [url, PREDICT])).status, 200);
  const serverTiming = await page.evaluate(
    (name) => performance.getEntriesByName(name, 'resource').flatMap((e) => e.serverTiming.map((s) => s.name)),
    url,
  );
  const { headers } = await network.one({ type: 'Fetch', url });
  assert.ok(headers['server-timing'], 'keyrelay sent Server-Timing');
  assert.equal(headers['timing-allow-origin'], allowed, 'keyrelay sent Timing-Allow-Origin: <the origin>');
  assert.ok(serverTiming.length > 0, 'PerformanceResourceTiming.serverTiming is empty');
});

test('port wildcard http://localhost:* allows any localhost port, not 127.0.0.1 on that port', CASE, async (t) => {
  const otherPages = await startPageServer();
  t.after(() => otherPages.close());
  const wildcard = await startKeyrelay({ key: KEY, upstream: upstream.url, origins: ['http://localhost:*'] });
  t.after(() => wildcard.stop());
  const url = `${wildcard.url}/production/predict`;
  const mark = upstream.mark();

  const { page: onLocalhost } = await browser.open(t, `http://localhost:${otherPages.port}`);
  const ok = await onLocalhost.evaluate(tryFetch, [url, PREDICT]);
  assert.equal(ok.status, 200, `from localhost:${otherPages.port}: ${JSON.stringify(ok)}`);
  assert.equal(JSON.parse(ok.body).output, ANSWER);

  const { page: onLoopbackIp, network } = await browser.open(t, `http://127.0.0.1:${otherPages.port}`);
  assert.deepEqual(await onLoopbackIp.evaluate(tryFetch, [url, PREDICT]), FAILED_FETCH);
  assert.equal((await network.one({ type: 'Fetch', url })).status, 403);

  assert.equal(upstream.since(mark).length, 1, 'only the localhost request was forwarded');
});

test('credentials: fetch with credentials: "include" works only with KEYRELAY_ALLOW_CREDENTIALS=true', CASE, async (t) => {
  const withCredentials = await startKeyrelay({
    key: KEY,
    upstream: upstream.url,
    origins: [allowed],
    env: { KEYRELAY_ALLOW_CREDENTIALS: 'true' },
  });
  t.after(() => withCredentials.stop());
  const { page, network } = await browser.open(t, allowed);
  const credentialed = { ...PREDICT_JSON, credentials: 'include' };
  const mark = upstream.mark();

  const granted = `${withCredentials.url}/production/predict`;
  const ok = await page.evaluate(tryFetch, [granted, credentialed]);
  assert.equal(ok.status, 200, JSON.stringify(ok));
  const preflight = await network.one({ type: 'Preflight', url: granted });
  assert.equal(preflight.headers['access-control-allow-credentials'], 'true', 'on the preflight');
  const actual = await network.one({ type: 'Fetch', url: granted });
  assert.equal(actual.headers['access-control-allow-credentials'], 'true', 'on the response');

  const refused = `${keyrelay.url}/production/predict?probe=credentials`;
  assert.deepEqual(await page.evaluate(tryFetch, [refused, credentialed]), FAILED_FETCH);
  const failed = await network.one({ type: 'Fetch', url: refused });
  assert.match(failed.corsError ?? '', /Credentials/, `CORS error: ${failed.corsError}`);

  assert.equal(upstream.since(mark).length, 1, 'only the granted request was forwarded');
});

// After the cases above: it checks everything they received.
test('the key is in no response header, body, WebSocket frame, streamed text or DOM the browser saw', CASE, (t) => {
  const kinds = ['response header sets', 'response bodies', 'streamed texts', 'WebSocket frames', 'DOM snapshots'];
  assert.ok(upstream.requests.some((r) => r.headers.authorization === `Api-Key ${KEY}`), 'the key was in play');
  for (const kind of kinds) assert.ok(witness.count(kind) > 0, `nothing of kind "${kind}" was recorded`);
  assert.deepEqual(witness.kindsContaining(KEY), [], 'the key appeared in these');
  t.diagnostic(`checked ${kinds.map((kind) => `${witness.count(kind)} ${kind}`).join(', ')}`);
});

test('keyrelay demo: its page streams a prediction and a chat into the DOM (screenshot)', CASE, async (t) => {
  const demo = await startDemo();
  t.after(() => demo.stop());
  const { page } = await browser.open(t, demo.pageUrl);
  for (const id of ['predict-output', 'chat-output']) {
    const output = await page.waitForSelector(`#${id}[data-done="true"]`, { timeout: 10_000 });
    const text = await output.textContent();
    assert.ok(text.includes(DEMO_ANSWER_START), `#${id} holds the streamed answer`);
    assert.ok(text.includes(DEMO_ANSWER_END), `#${id} holds the answer's non-ASCII end whole: ${text}`);
  }
  await mkdir(OUT_DIR, { recursive: true });
  const screenshot = path.join(OUT_DIR, 'demo.png');
  await page.screenshot({ path: screenshot, fullPage: true });
  const { size } = await stat(screenshot);
  assert.ok(size > 5_000, `${screenshot} is ${size} bytes`);
});
