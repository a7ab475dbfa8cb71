// The official openai SDK for Node.js through keyrelay with add_stream_usage:
// keyrelay asks the upstream for the usage the SDK did not ask for, counts
// it, and keeps the usage-only chunk (`choices: []`) from the SDK, so code
// that reads `chunk.choices[0]` on every chunk keeps working. A client that
// asks for usage itself still gets it. The mock upstream demands the key
// keyrelay injects; keyrelay is the real binary. Run by run.sh.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import OpenAI from 'openai';

const CASE = { timeout: 15_000 };
const KEY = randomBytes(18).toString('base64url');
const TOKENS = ['The', ' mistral', ' is', ' cold', '.'];
const USAGE = { prompt_tokens: 7, completion_tokens: TOKENS.length, total_tokens: 7 + TOKENS.length };
const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

let upstream, keyrelay;
const asked = []; // stream_options.include_usage of each request the upstream saw

/** An OpenAI-compatible upstream that sends usage only when asked, as OpenAI does. */
function startUpstream() {
  const server = http.createServer((req, res) => {
    if (req.headers.authorization !== `Api-Key ${KEY}`) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":"no key"}');
      return;
    }
    let body = '';
    req.on('data', (chunk) => (body += chunk));
    req.on('end', () => {
      const request = JSON.parse(body);
      const includeUsage = request.stream_options?.include_usage === true;
      asked.push(includeUsage);
      const chunk = (choices, extra = {}) =>
        `data: ${JSON.stringify({ id: 'c', object: 'chat.completion.chunk', created: 1, model: 'm', choices, ...extra })}\n\n`;
      if (!request.stream) {
        res.writeHead(200, { 'content-type': 'application/json' }).end(
          JSON.stringify({
            id: 'c', object: 'chat.completion', created: 1, model: 'm',
            choices: [{ index: 0, message: { role: 'assistant', content: TOKENS.join('') }, finish_reason: 'stop' }],
            usage: USAGE,
          }),
        );
        return;
      }
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(chunk([{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }]));
      for (const token of TOKENS) res.write(chunk([{ index: 0, delta: { content: token }, finish_reason: null }]));
      // The last chunk, the usage chunk and [DONE] in one write.
      let tail = chunk([{ index: 0, delta: {}, finish_reason: 'stop' }]);
      if (includeUsage) tail += chunk([], { usage: USAGE });
      res.end(`${tail}data: [DONE]\n\n`);
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

/** The keyrelay binary with add_stream_usage, its proxy and admin ports read from the ready line. */
function startKeyrelay(upstreamPort) {
  const binary = process.env.KEYRELAY_BIN ?? path.join(REPO, 'target/debug/keyrelay');
  const child = spawn(
    binary,
    ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--warm-connections', '0',
      '--upstream', `http://127.0.0.1:${upstreamPort}`, '--add-stream-usage'],
    { env: { PATH: process.env.PATH, BASETEN_API_KEY: KEY }, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  return new Promise((resolve, reject) => {
    let log = '';
    const timer = setTimeout(() => reject(new Error(`keyrelay did not start:\n${log}`)), 10_000);
    child.stderr.on('data', (data) => {
      log += data;
      const ready = /keyrelay ready.*listen=127\.0\.0\.1:(\d+).*admin=127\.0\.0\.1:(\d+)/.exec(log);
      if (ready) {
        clearTimeout(timer);
        resolve({ child, port: Number(ready[1]), admin: Number(ready[2]) });
      }
    });
    child.on('exit', (code) => reject(new Error(`keyrelay exited ${code}:\n${log}`)));
  });
}

/** The value of one metric sample on keyrelay's admin port, or undefined. */
async function metric(series) {
  const text = await (await fetch(`http://127.0.0.1:${keyrelay.admin}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line && Number(line.split(' ')[1]);
}

/** Polls `probe` (bounded) until it returns a truthy value. */
async function eventually(what, probe) {
  const deadline = Date.now() + 5_000;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const sdk = () =>
  new OpenAI({ baseURL: `http://127.0.0.1:${keyrelay.port}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 10_000 });

before(async () => {
  upstream = await startUpstream();
  keyrelay = await startKeyrelay(upstream.address().port);
});

after(() => {
  keyrelay?.child.kill('SIGTERM');
  upstream?.close();
});

test('a stream the SDK did not ask usage for: keyrelay asks, counts it, and the SDK never sees the usage chunk', CASE, async () => {
  const stream = await sdk().chat.completions.create({ model: 'm', stream: true, messages: [{ role: 'user', content: 'hi' }] });
  let text = '';
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    text += chunk.choices[0].delta.content ?? ''; // a usage-only chunk would throw here
  }
  assert.equal(text, TOKENS.join(''));
  assert.equal(chunks, TOKENS.length + 2, 'role, tokens and finish chunks; no usage chunk');
  assert.equal(asked.at(-1), true, 'keyrelay added stream_options.include_usage');
  const series = 'keyrelay_llm_tokens_total{route="default",access_token="",kind="completion"}';
  assert.equal(await eventually('the completion tokens counted', () => metric(series)), TOKENS.length);
});

test('a stream that asks for usage itself still gets it', CASE, async () => {
  const stream = await sdk().chat.completions.create({
    model: 'm', stream: true, stream_options: { include_usage: true }, messages: [{ role: 'user', content: 'hi' }],
  });
  let usage;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
  }
  assert.deepEqual(usage, USAGE);
});

test('a non-streamed completion is passed as it is, usage included', CASE, async () => {
  const completion = await sdk().chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }] });
  assert.equal(completion.choices[0].message.content, TOKENS.join(''));
  assert.deepEqual(completion.usage, USAGE);
  assert.equal(asked.at(-1), false, 'a request that does not stream is not rewritten');
});
