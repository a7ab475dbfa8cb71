// keyrelay as the cases run it: the real binary as a child process, with an
// environment cleared down to PATH plus what each case sets, so nothing from
// the developer's shell (a real BASETEN_API_KEY, a KEYRELAY_* setting) leaks
// in. Its address comes from its own `keyrelay ready listen=...` log line, as
// it listens on 127.0.0.1:0. Stopped with SIGTERM, as an operator would.

import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const binary = process.env.KEYRELAY_BIN || path.join(repo, 'target/debug/keyrelay');

const STARTUP_TIMEOUT_MS = 10_000;
const SHUTDOWN_TIMEOUT_MS = 10_000;

// Children still running if the run dies early are killed as Node exits.
const running = new Set();
process.on('exit', () => running.forEach((child) => child.kill('SIGKILL')));
process.on('SIGTERM', () => process.exit(143));

/** Starts `keyrelay ...args` with exactly `env` (plus PATH). */
function launch(args, env) {
  const child = spawn(binary, args, {
    env: { PATH: process.env.PATH, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  running.add(child);
  const output = { stdout: '', stderr: '' };
  child.stdout.setEncoding('utf8').on('data', (text) => (output.stdout += text));
  child.stderr.setEncoding('utf8').on('data', (text) => (output.stderr += text));
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal)));
  exited.then(() => running.delete(child));
  return { child, output, exited };
}

/** Resolves with the first match of `pattern` in `output[stream]`; rejects if keyrelay exits or is slow. */
function waitFor({ child, output, exited }, stream, pattern, what) {
  const printed = () => `\n--- stdout\n${output.stdout}--- stderr\n${output.stderr}`;
  return new Promise((resolve, reject) => {
    const check = () => {
      const match = pattern.exec(output[stream]);
      if (match) finish(() => resolve(match));
    };
    const timer = setTimeout(
      () => finish(() => reject(new Error(`keyrelay did not print ${what} within ${STARTUP_TIMEOUT_MS} ms:${printed()}`))),
      STARTUP_TIMEOUT_MS,
    );
    const finish = (settle) => {
      clearTimeout(timer);
      child[stream].off('data', check);
      settle();
    };
    child[stream].on('data', check);
    exited.then((status) =>
      finish(() => reject(new Error(`keyrelay exited (${status}) before printing ${what}:${printed()}`))),
    );
    check();
  });
}

/** SIGTERM, then the exit; a keyrelay that does not exit is an error. */
async function stop({ child, output, exited }) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  let timer;
  const late = new Promise((resolve) => (timer = setTimeout(resolve, SHUTDOWN_TIMEOUT_MS, 'late')));
  const outcome = await Promise.race([exited, late]);
  clearTimeout(timer);
  if (outcome === 'late') {
    child.kill('SIGKILL');
    throw new Error(`keyrelay did not exit within ${SHUTDOWN_TIMEOUT_MS} ms of SIGTERM:\n${output.stderr}`);
  }
}

/**
 * Starts keyrelay in front of `upstream` with the key in BASETEN_API_KEY.
 * `origins` become KEYRELAY_ALLOWED_ORIGINS; `env` adds settings.
 * Returns { url: 'http://127.0.0.1:PORT', port, stop() }.
 */
export async function startKeyrelay({ key, upstream, origins, env = {} }) {
  const proc = launch(['--listen', '127.0.0.1:0'], {
    BASETEN_API_KEY: key,
    KEYRELAY_UPSTREAM: upstream,
    KEYRELAY_ALLOWED_ORIGINS: origins.join(','),
    ...env,
  });
  const [, port] = await waitFor(proc, 'stderr', /keyrelay ready.*\blisten=127\.0\.0\.1:(\d+)\s/, '"keyrelay ready listen=..."');
  return { url: `http://127.0.0.1:${port}`, port: Number(port), stop: () => stop(proc) };
}

/** Starts `keyrelay demo` and returns the URL of its page once it is ready. */
export async function startDemo() {
  const proc = launch(['demo', '--listen', '127.0.0.1:0'], {});
  await waitFor(proc, 'stdout', /Press Ctrl-C/, '"Press Ctrl-C"');
  // The line naming the page: the first http:// word after the word "page".
  const pageUrl = /\bpage\b.*?(http:\/\/\S+)/.exec(proc.output.stdout)?.[1];
  if (!pageUrl) throw new Error(`keyrelay demo printed no page URL:\n${proc.output.stdout}`);
  return { pageUrl, stop: () => stop(proc) };
}
