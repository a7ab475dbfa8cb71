// The browser side of the fixture: Debian's Chromium driven by playwright-core,
// pages served from real local origins, and a record of everything the browser
// received, read from Chromium's own DevTools network events (CDP). CDP sees
// what the page cannot: CORS preflights, the status of a response CORS hid
// from the page, every raw response header, WebSocket handshakes and frames.

import http from 'node:http';
import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';

// The closed network refuses Google's hosts, so every background service is
// off; the resolver rule lets a page load from "attacker.test" that resolves
// to 127.0.0.1, as a DNS-rebinding attack arranges.
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--host-resolver-rules=MAP attacker.test 127.0.0.1',
];

const BLANK_PAGE = '<!doctype html><meta charset="utf-8"><title>keyrelay browser test</title><p>test page</p>';

/** A server for a blank page on 127.0.0.1:0, reachable as http://localhost:PORT and http://127.0.0.1:PORT. */
export async function startPageServer() {
  const server = http.createServer((req, res) => {
    if (req.url !== '/') return res.writeHead(404).end();
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(BLANK_PAGE);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: server.address().port,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Everything the browser received, by kind, for the key-leak check. */
export class Witness {
  #seen = new Map();

  add(kind, text) {
    if (!this.#seen.has(kind)) this.#seen.set(kind, []);
    this.#seen.get(kind).push(String(text));
  }

  count(kind) {
    return this.#seen.get(kind)?.length ?? 0;
  }

  /** The kinds of text in which `secret` appears. */
  kindsContaining(secret) {
    return [...this.#seen].filter(([, texts]) => texts.some((t) => t.includes(secret))).map(([kind]) => kind);
  }
}

/** How long a case waits for Chromium to report a request it has made. */
const NETWORK_EVENT_TIMEOUT_MS = 5_000;
// How long a failed request waits for a wire status CDP may still report.
const LATE_EXTRA_INFO_MS = 500;

/**
 * Records a page's network activity through CDP. Each entry, keyed by request:
 * { url, method, type ('Fetch', 'Preflight', 'Document', 'WebSocket', ...),
 *   status, headers (raw, lower-case names), body, corsError, error, frames,
 *   finished }.
 */
async function recordNetwork(page) {
  const cdp = await page.context().newCDPSession(page);
  const entries = new Map();
  const pending = [];
  const waiters = new Set();
  const lower = (headers) => Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
  const find = (fields) => [...entries.values()].filter((e) => Object.entries(fields).every(([k, v]) => e[k] === v));

  // Applies one CDP event's facts to its request's entry, then wakes the waiters.
  const on = (event, facts) =>
    cdp.on(`Network.${event}`, (params) => {
      const e = entries.get(params.requestId) ?? entries.set(params.requestId, { frames: [] }).get(params.requestId);
      facts(e, params);
      waiters.forEach((check) => check());
    });

  on('requestWillBeSent', (e, { request, type }) => Object.assign(e, { url: request.url, method: request.method, type }));
  on('responseReceived', (e, { type, response }) => {
    Object.assign(e, { url: response.url, type });
    e.status ??= response.status;
    e.headers ??= lower(response.headers);
  });
  // The wire's status and headers, also for responses CORS keeps from the page.
  on('responseReceivedExtraInfo', (e, { statusCode, headers }) => Object.assign(e, { status: statusCode, headers: lower(headers) }));
  on('loadingFailed', (e, { errorText, corsErrorStatus }) =>
    Object.assign(e, { finished: true, finishedAt: Date.now(), error: errorText, corsError: corsErrorStatus?.corsError }),
  );
  on('loadingFinished', (e, { requestId }) => {
    e.finished = true;
    const keepBody = ({ body, base64Encoded }) => (e.body = base64Encoded ? Buffer.from(body, 'base64').toString() : body);
    pending.push(cdp.send('Network.getResponseBody', { requestId }).then(keepBody, () => {})); // some keep none
  });
  on('webSocketCreated', (e, { url }) => Object.assign(e, { url, type: 'WebSocket' }));
  on('webSocketWillSendHandshakeRequest', (e, { request }) => (e.requestHeaders = lower(request.headers)));
  on('webSocketHandshakeResponseReceived', (e, { response }) =>
    Object.assign(e, { status: response.status, headers: lower(response.headers) }),
  );
  on('webSocketFrameReceived', (e, { response }) => e.frames.push(response.payloadData));
  on('webSocketFrameError', (e, { errorMessage }) => (e.error = errorMessage));
  await cdp.send('Network.enable');

  // Whether Chromium has said all it will about a request: a preflight's or
  // a WebSocket handshake's answer, or the end of any other request.
  // A request that failed (CORS hid its response) may still get its wire
  // status in a responseReceivedExtraInfo that CDP delivers after
  // loadingFailed: such an entry is complete once that status is in, or a
  // moment after the failure if no response ever came (a POST whose
  // preflight was refused was never sent).
  const complete = (e) =>
    e.type === 'Preflight'
      ? e.status !== undefined
      : e.type === 'WebSocket'
        ? Boolean(e.status || e.error)
        : e.finished && (e.status !== undefined || e.finishedAt === undefined || Date.now() - e.finishedAt >= LATE_EXTRA_INFO_MS);

  return {
    /** Entries matching every field of `fields` (e.g. { type: 'Preflight', url }), as recorded so far. */
    find,
    all: () => [...entries.values()],
    /** The one entry matching `fields`, once complete (CDP events trail the page's own view). */
    one: (fields) =>
      new Promise((resolve, reject) => {
        const check = () => {
          const found = find(fields);
          if (found.length > 1) done(() => reject(new Error(`${found.length} requests match ${JSON.stringify(fields)}`)));
          else if (found.length === 1 && complete(found[0])) done(() => resolve(found[0]));
        };
        const timer = setTimeout(() => {
          const seen = JSON.stringify(find(fields));
          done(() => reject(new Error(`Chromium reported no complete request matching ${JSON.stringify(fields)}: ${seen}`)));
        }, NETWORK_EVENT_TIMEOUT_MS);
        let done = (settle) => {
          clearTimeout(timer);
          waiters.delete(check);
          settle();
        };
        waiters.add(check);
        // Events wake the check; this catches the end of the grace above.
        const recheck = setInterval(check, 50);
        const settleOnce = done;
        done = (settle) => {
          clearInterval(recheck);
          settleOnce(settle);
        };
        check();
      }),
    /** Waits for the response bodies still being fetched from Chromium. */
    settled: () => Promise.all(pending),
  };
}

/**
 * Launches Chromium. `onPageText` is exposed to every page as
 * `window.reportText(text)`: a page calls it with each piece of a stream it
 * reads, which is what lets the mock upstream send the next token.
 */
export async function launchBrowser({ witness, onPageText }) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 30_000 });

  /**
   * Opens `url` in a fresh browser context for test `t`, and closes it when the
   * test ends (or times out, which also ends the page's streams). What the
   * page received goes to the witness. Returns { page, network, response }.
   */
  async function open(t, url) {
    const context = await browser.newContext();
    t.signal.addEventListener('abort', () => context.close().catch(() => {}));
    await context.exposeFunction('reportText', onPageText);
    const page = await context.newPage();
    const network = await recordNetwork(page);
    t.after(async () => {
      await network.settled();
      witness.add('DOM snapshots', await page.content().catch(() => ''));
      for (const e of network.all()) {
        if (e.headers) witness.add('response header sets', JSON.stringify(e.headers));
        if (e.body !== undefined) witness.add('response bodies', e.body);
        for (const frame of e.frames) witness.add('WebSocket frames', frame);
      }
      await context.close();
    });
    const response = await page.goto(url);
    return { page, network, response };
  }

  return { open, close: () => browser.close() };
}
