// A mock Baseten on 127.0.0.1: the upstream keyrelay forwards the browser's
// requests to. It proves three things to the cases:
// - the key arrived: every request, WebSocket upgrades included, must carry
//   `Authorization: Api-Key <key>` (401 otherwise), which the page never had;
// - what was forwarded: it records every request it receives, so a case can
//   assert that a refused request reached nothing;
// - that streams are not buffered: it sends token i+1 only once the page has
//   reported token i (lockstep), so a keyrelay that held tokens back would
//   stall the stream until the case times out, with no sleep as proof.

import http from 'node:http';
import { WebSocketServer } from 'ws';

/** Word tokens of `answer`, each but the first keeping its leading space. */
export function tokenize(answer) {
  return answer.match(/ ?[^ ]+/g);
}

/** The text a page has read from the stream in flight, and who waits on it. */
class Lockstep {
  text = '';
  sent = 0;
  closed = false;
  #wake = () => {};

  /** The page read `delta` (called through the page's exposed function). */
  saw(delta) {
    this.text += delta;
    this.#wake();
  }

  /** The response ended or the client left: stop waiting for the page. */
  close() {
    this.closed = true;
    this.#wake();
  }

  /** Resolves once the page has read `expected` in full; rejects if the stream closes first. */
  async until(expected) {
    while (!this.text.startsWith(expected)) {
      if (this.closed) throw new Error('stream closed before the page read its tokens');
      await new Promise((resolve) => {
        this.#wake = resolve;
      });
    }
  }
}

/** Starts the mock; `await upstream.close()` stops it. */
export async function startUpstream({ key, answer }) {
  const tokens = tokenize(answer);
  const requests = [];
  let stream = new Lockstep();
  const wss = new WebSocketServer({ noServer: true });

  const record = (req) => requests.push({ method: req.method, path: req.url, headers: req.headers });
  const authorized = (req) => req.headers.authorization === `Api-Key ${key}`;

  // Writes one frame per token, each only after the page has read the one before.
  async function streamTokens(res, frame, trailer = '') {
    stream = new Lockstep();
    const current = stream;
    res.on('close', () => current.close());
    for (let i = 0; i < tokens.length; i++) {
      res.write(frame(tokens[i], i));
      current.sent += 1;
      await current.until(tokens.slice(0, i + 1).join(''));
    }
    res.end(trailer);
  }

  const chatChunk = (token, i) =>
    `data: ${JSON.stringify({
      id: 'chatcmpl-browser-test',
      object: 'chat.completion.chunk',
      model: 'mock',
      choices: [{ index: 0, delta: i === 0 ? { role: 'assistant', content: token } : { content: token } }],
    })}\n\n`;

  async function handle(req, res, body) {
    const route = `${req.method} ${new URL(req.url, 'http://upstream').pathname}`;
    if (route === 'POST /production/predict') {
      if (!body.stream) return json(res, 200, { output: answer });
      res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
      return streamTokens(res, (token) => token);
    }
    if (route === 'POST /v1/chat/completions' && body.stream) {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      return streamTokens(res, chatChunk, 'data: [DONE]\n\n');
    }
    return json(res, 404, { error: `mock upstream has no ${route}` });
  }

  const server = http.createServer(async (req, res) => {
    record(req);
    let raw = '';
    for await (const chunk of req) raw += chunk;
    if (!authorized(req)) return json(res, 401, { error: 'missing or wrong Api-Key' });
    let body = {};
    try {
      body = raw ? JSON.parse(raw) : {};
    } catch {
      return json(res, 400, { error: 'body is not JSON' });
    }
    handle(req, res, body).catch(() => res.destroy());
  });

  // GET /v1/websocket: an echo socket, opened only with the key on the upgrade.
  server.on('upgrade', (req, socket, head) => {
    record(req);
    if (new URL(req.url, 'http://upstream').pathname !== '/v1/websocket' || !authorized(req)) {
      socket.end('HTTP/1.1 401 Unauthorized\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
    });
  });

  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));

  return {
    url: `http://127.0.0.1:${server.address().port}`,
    tokens,
    /** Every request received so far: { method, path, headers }. */
    requests,
    /** A bookmark for `since`. */
    mark: () => requests.length,
    /** Requests received after `mark`. */
    since: (mark) => requests.slice(mark),
    /** Exposed to pages: the text they read from the stream in flight. */
    pageSaw: (delta) => stream.saw(delta),
    /** How far the last stream got, or null if the page read all of it. */
    stall: () =>
      stream.text === answer
        ? null
        : `the upstream sent ${stream.sent} of ${tokens.length} tokens; the page read ${JSON.stringify(stream.text)}`,
    close: async () => {
      for (const ws of wss.clients) ws.terminate();
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

function json(res, status, value) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(value));
}
