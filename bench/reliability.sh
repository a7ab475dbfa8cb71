#!/usr/bin/env bash
# Generates RELIABILITY.md: every hostile input and every upstream fault with
# what keyrelay did, the attacks on its policies (issue 23) with their
# results, the soak figures, and the fuzzing figures. Nothing in it is typed
# by hand.
#
#   bench/reliability.sh           full: soak SOAK_SECONDS (default 120), fuzz
#                                  FUZZ_SECONDS per target (default 60); about
#                                  4.5 minutes after the builds
#   bench/reliability.sh --quick   soak --smoke (15 s) and 15 s of fuzzing per
#                                  target; about 1.5 minutes after the builds
# (The builds, the first time: the tests in debug, keyrelay in release with
# LTO, the fuzz targets: about 10 minutes on 2 cores.)
#   bench/reliability.sh --out FILE   write the report elsewhere (default RELIABILITY.md)
#
# Steps:
#   1. cargo test --test it -- hostile_input:: upstream_faults:: (and the
#      modules of the issue 23 tests, TEST_FILTERS below) --nocapture: every
#      case prints `RELIABILITY|table|cell|cell|...`; the lines become the
#      tables (table `issue23`: attack, what keyrelay did), and each test's
#      verdict is listed (a failing test is a bug found, named in the report;
#      the run goes on).
#   2. bench/soak.sh [--smoke] --out FIGURES: the soak and its checks.
#   3. fuzz/run.sh with FUZZ_OUT: executions and findings per fuzz target
#      (skipped with RELIABILITY_SKIP_FUZZ=1, e.g. where cargo-fuzz cannot be
#      installed; the report then says so).
# Exit status: 0 when the report was written, whatever it found; 1 when a
# step could not run at all.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=0
OUT=$ROOT/RELIABILITY.md
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/reliability.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done

log() { printf '[reliability %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

WORK=$(mktemp -d /tmp/keyrelay-reliability.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# The hostile-input and upstream-fault tables, then the modules whose tests
# print the issue 23 rows (policies tried by the clients they restrain).
TEST_FILTERS=(
  hostile_input:: upstream_faults::
  budget_escapes:: routes:: security:: operations:: config_errors::
  upstream_pool:: key_rotation:: unix_socket:: client_timeouts::
  retries::
)

log "1/3 hostile-input, upstream-fault and policy tests"
started=$SECONDS
set +e
nice cargo test --no-fail-fast --test it -- "${TEST_FILTERS[@]}" --nocapture \
  >"$WORK/tests.out" 2>&1
TESTS_STATUS=$?
nice cargo test --quiet --test it -- "${TEST_FILTERS[@]}" --list >"$WORK/tests.list" 2>/dev/null
set -e
cp "$WORK/tests.out" "$WORK/tests.err"
TESTS_SECS=$((SECONDS - started))
grep -q '^test result:' "$WORK/tests.out" || {
  log "the tests did not run:"
  tail -20 "$WORK/tests.err" >&2
  exit 1
}

log "2/3 soak"
SOAK_ARGS=(--out "$WORK/soak.txt")
[ "$QUICK" = 1 ] && SOAK_ARGS+=(--smoke)
set +e
bench/soak.sh "${SOAK_ARGS[@]}" >"$WORK/soak.out" 2>"$WORK/soak.err"
SOAK_STATUS=$?
set -e
[ -s "$WORK/soak.txt" ] || {
  log "the soak did not produce figures:"
  tail -20 "$WORK/soak.err" >&2
  exit 1
}

: >"$WORK/fuzz.txt"
FUZZ_STATUS=skipped
if [ "${RELIABILITY_SKIP_FUZZ:-0}" != 1 ]; then
  FUZZ_EACH=${FUZZ_SECONDS:-60}
  [ "$QUICK" = 1 ] && FUZZ_EACH=${FUZZ_SECONDS:-15}
  log "3/3 fuzzing, ${FUZZ_EACH}s per target"
  set +e
  FUZZ_SECONDS=$FUZZ_EACH FUZZ_OUT=$WORK/fuzz.txt fuzz/run.sh >"$WORK/fuzz.out" 2>"$WORK/fuzz.err"
  FUZZ_STATUS=$?
  set -e
  [ -s "$WORK/fuzz.txt" ] || {
    log "fuzzing did not run:"
    tail -20 "$WORK/fuzz.err" >&2
    exit 1
  }
fi

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes in src/)"

log "writing $OUT"
python3 - "$WORK" "$OUT" "$COMMIT" "$QUICK" "$TESTS_STATUS" "$TESTS_SECS" "$SOAK_STATUS" "$FUZZ_STATUS" \
  "${TEST_FILTERS[@]%::}" <<'PYTHON'
import datetime
import os
import platform
import re
import sys

work, out, commit, quick, tests_status, tests_secs, soak_status, fuzz_status = sys.argv[1:9]
test_modules = sys.argv[9:]

def read(name):
    path = os.path.join(work, name)
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""

def cells(line):
    # `|` inside a cell arrives escaped as `\|`.
    parts = re.split(r"(?<!\\)\|", line)
    return [p.replace("\\|", "|") for p in parts]

def md(cell):
    cell = cell.replace("|", "\\|").strip()
    return cell if cell else "-"

def code(cell):
    # Not stripped: a leading space can be the point of the case.
    if not cell.strip() or cell == "-":
        return "-"
    fence = "``" if "`" in cell else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{cell.replace('|', '&#124;')}{pad}{fence}"

tests_out = read("tests.out")
rows = {}
for line in tests_out.splitlines():
    # A test's first line shares the `test name ... ` prefix printed before it.
    at = line.find("RELIABILITY|")
    if at < 0:
        continue
    parts = cells(line[at:])
    rows.setdefault(parts[1], []).append(parts[2:])

# With --nocapture the per-test "ok" lines interleave with the output, so the
# verdicts come from the list of tests and the summary's list of failures.
names = re.findall(r"^(\S+): test$", read("tests.list"), re.M)
failed = []
for block in re.findall(r"^failures:\n((?:    \S+\n)+)", tests_out, re.M):
    failed += block.split()
failed = sorted(set(failed))
verdicts = [(name, "FAILED" if name in failed else "ok") for name in names]
panics = {}
for match in re.finditer(r"thread '([^']+)'[^\n]* panicked at [^\n]*\n([^\n]*)", tests_out):
    panics.setdefault(match.group(1), match.group(2).strip())

soak = {}
for line in read("soak.txt").splitlines():
    if " " in line:
        key, value = line.split(" ", 1)
        soak[key] = value.strip()

fuzz = [cells(line)[1:] for line in read("fuzz.txt").splitlines() if line.startswith("FUZZ|")]

def table(header, body, code_columns=()):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in body:
        row = (row + ["-"] * len(header))[: len(header)]
        shown = [code(c) if i in code_columns else md(c) for i, c in enumerate(row)]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines)

def mib(kb):
    try:
        return f"{int(kb) / 1024:.1f} MiB"
    except (TypeError, ValueError):
        return "?"

now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
cpu = "?"
for line in open("/proc/cpuinfo", encoding="utf-8"):
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break

doc = []
w = doc.append
w("# keyrelay reliability report")
w("")
w(f"Generated by `bench/reliability.sh{' --quick' if quick == '1' else ''}` on {now}, keyrelay commit {commit}, "
  f"on {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}. "
  "Every table below is produced from the output of the tests, the soak and the fuzzers; "
  "regenerate it with `bench/reliability.sh` rather than editing it.")
w("")
w("## Summary")
w("")
OWN_SECTIONS = {"fault", "issue23", "issue25"}
total_cases = sum(len(v) for k, v in rows.items() if k not in OWN_SECTIONS)
w(f"- **Hostile input**: {total_cases} bad inputs sent through real sockets "
  f"(`tests/it/hostile_input.rs`); **upstream faults**: {len(rows.get('fault', []))} injected "
  f"(`tests/it/upstream_faults.rs`).")
w(f"- **Policies against the clients they restrain (issue 23)**: {len(rows.get('issue23', []))} attacks "
  "by a hostile client, page, upstream or config, each with what keyrelay did.")
w(f"- **Retries and failover (issue 25)**: {len(rows.get('issue25', []))} cases of what is retried "
  "and what never is, each with the attempts the upstream saw.")
w(f"- **Tests** ({', '.join(f'`{m}`' for m in test_modules)}): "
  f"{sum(1 for _, v in verdicts if v == 'ok')} passed, {len(failed)} failed in {tests_secs} s.")
if failed:
    w("- **Failing tests (bugs found, not yet fixed)**:")
    for name in failed:
        w(f"  - `{name}`: {md(panics.get(name, 'see the test output'))}")
if soak:
    w(f"- **Soak** ({soak.get('soak_mode', '?')}, {soak.get('soak_seconds', '?')} s): "
      f"{soak.get('driver_requests', '?')} requests ({soak.get('driver_streams', '?')} streams, "
      f"{int(soak.get('driver_cancelled_mid', 0)) + int(soak.get('driver_cancelled_head', 0))} cancelled by the client), "
      f"{soak.get('driver_errors', '?')} errors; verdict **{soak.get('verdict', '?')}**.")
if fuzz:
    w("- **Fuzzing**: " + "; ".join(
        f"`{f[0]}` {int(f[1]):,} executions in {f[2]} s, "
        f"{f[6] if int(f[6]) else 'no'} distinct failure{'' if f[6] == '1' else 's'}"
        + (f" ({f[5]} failing inputs)" if int(f[5]) else "") for f in fuzz) + ".")
else:
    w("- **Fuzzing**: not run (RELIABILITY_SKIP_FUZZ=1).")
w("")

sections = [
    ("request-line", "Malformed request lines",
     "Sent raw on a fresh connection; then the next request, on a new connection, must be served. "
     "hyper answers parse errors itself: a bare status with an empty body (not keyrelay's JSON), then it closes.",
     ["case", "bytes sent", "expected", "keyrelay answered", "upstream saw", "next request"], (1,)),
    ("header", "Malformed and oversized headers", "", 
     ["case", "bytes sent", "expected", "keyrelay answered", "upstream saw", "next request"], (1,)),
    ("framing", "Message framing and request smuggling",
     "Every payload tries to smuggle `GET /smuggled`; the upstream is a strict raw HTTP/1.1 parser that "
     "counts requests and flags any message with both Content-Length and Transfer-Encoding, a coding "
     "other than chunked, or a malformed chunk. A request keyrelay forwards is re-framed by hyper, so the "
     "upstream sees exactly the body keyrelay parsed.",
     ["case", "bytes sent", "expected", "keyrelay answered", "upstream saw", "next request"], (1,)),
    ("target", "Request targets: forwarded byte for byte or refused",
     "The upstream is configured with the base path `/base`; a target must arrive as `/base` + the bytes sent.",
     ["target sent", "expected", "outcome", "next request"], (0,)),
    ("absolute", "Absolute-form, authority-form and CONNECT",
     "A second recorder listens on another loopback port and is named in each request; it must see no "
     "connection at all.",
     ["case", "bytes sent", "expected", "keyrelay answered", "upstream saw", "next request"], (1,)),
    ("http2", "HTTP/2: rapid reset, stream limits, malformed requests", "",
     ["case", "input", "keyrelay did", "upstream saw", "other clients / next request"], ()),
    ("slow", "Slow clients", "",
     ["case", "slow connections", "normal client meanwhile", "upstream"], ()),
]
w("## Hostile input")
w("")
for key, title, intro, header, code_columns in sections:
    if key not in rows:
        continue
    w(f"### {title}")
    w("")
    if intro:
        w(intro)
        w("")
    w(table(header, rows[key], code_columns))
    w("")
for key in sorted(set(rows) - {s[0] for s in sections} - OWN_SECTIONS):
    w(f"### {key}")
    w("")
    w(table(["case"] + [""] * (max(len(r) for r in rows[key]) - 1), rows[key]))
    w("")

w("## Policies against the clients they restrain (issue 23)")
w("")
w("Each rule keyrelay enforces (budgets, request caps, route policy, path rules, methods, the admin "
  "port, request trailers, timeouts, the upstream URL and the other settings that could leak the key) "
  "was tried from outside, the way a hostile script or web page on the same machine, a misbehaving "
  "upstream or a careless config would try it. Each row is one attempt and what keyrelay did, as the test "
  "that made the attempt observed it (tokens charged, status and error type, what the upstream received, "
  "exit status and message); the tests are in `tests/it/` (`budget_escapes`, `routes`, `security`, "
  "`operations`, `config_errors`, `hostile_input`, `upstream_faults`, `upstream_pool`, `key_rotation`, "
  "`unix_socket`, `client_timeouts`) and listed under Test verdicts. Rows are sorted by attack.")
w("")
issue23 = sorted(rows.get("issue23", []), key=lambda r: (r[0].lower(), r[1:]))
w(table(["attack", "keyrelay did"], issue23))
w("")

w("## Retries and failover")
w("")
w("Each case drives `retry_on` / `fallback` through real sockets (`tests/it/retries.rs`) and counts the attempts "
  "the upstream saw, so a retry after the first response byte, a replay of a body keyrelay did not keep whole, "
  "or a failing upstream hammered past the budget would show in the count.")
w("")
w(table(["case", "what happened"], sorted(rows.get("issue25", []))))
w("")

w("## Upstream faults")
w("")
w("What a client saw for each fault injected at the upstream, and the next request through the same keyrelay. "
  "Failures before the response head are keyrelay's own JSON errors; after it, the body is aborted "
  "(HTTP/1.1: connection closed without the last chunk; HTTP/2: stream reset), never ended as if complete.")
w("")
w(table(["fault injected", "what the client saw", "next request"], rows.get("fault", [])))
w("")

w("## Soak")
w("")
if soak:
    w(f"`bench/soak.sh{' --smoke' if soak.get('soak_mode') == 'smoke' else ''}`: a release keyrelay with "
      f"`--admin-listen` in front of the benchmark's mock upstream, {soak.get('soak_concurrency', '?')} workers "
      f"for {soak.get('soak_seconds', '?')} s (seed {soak.get('soak_seed', '?')}), each repeatedly opening a short "
      "stream and reading it to the end, opening a long stream and closing it after a few records or at its "
      "head, or sending a few keep-alive requests. Soak exit status: "
      f"{'0 (all checks passed)' if soak_status == '0' else soak_status + ' (a check failed)'}.")
    w("")
    outcomes = ", ".join(
        f"{k[len('outcome_'):]} {v}" for k, v in sorted(soak.items())
        if k.startswith("outcome_") and v != "0")
    figures = [
        ["requests sent", soak.get("driver_requests", "?")],
        ["of which streams", soak.get("driver_streams", "?")],
        ["read to the end", soak.get("driver_completed", "?")],
        ["cancelled mid-stream", soak.get("driver_cancelled_mid", "?")],
        ["cancelled at the response head", soak.get("driver_cancelled_head", "?")],
        ["keep-alive requests", soak.get("driver_keepalive_requests", "?")],
        ["client-side errors", soak.get("driver_errors", "?")],
        ["streams open at once (peak)", soak.get("driver_peak_open", "?")],
        ["keyrelay_requests_total (all label sets)", soak.get("requests_total", "?")],
        ["by outcome and status class", outcomes or "?"],
        ["streams still open at the upstream afterwards", soak.get("upstream_open_streams_after", "?")],
        ["open descriptors: before / peak / after", f"{soak.get('fd_before', '?')} / {soak.get('fd_peak', '?')} / {soak.get('fd_after', '?')}"],
        ["sockets: before / after", f"{soak.get('sockets_before', '?')} / {soak.get('sockets_after', '?')}"],
        ["VmRSS before the load", mib(soak.get("rss_before_kb"))],
        ["VmRSS highest, middle third of the run", mib(soak.get("rss_mid_third_max_kb"))],
        ["VmRSS highest, last third of the run", mib(soak.get("rss_last_third_max_kb"))],
        ["VmRSS peak / after", f"{mib(soak.get('rss_peak_kb'))} / {mib(soak.get('rss_after_kb'))}"],
        ["RSS samples (1 per second)", soak.get("rss_samples", "?")],
        ["verdict", soak.get("verdict", "?")],
    ]
    w(table(["figure", "value"], figures))
    w("")
    w("Checks: every request is accounted for (`keyrelay_requests_total` summed == requests sent, none active); "
      "every cancellation reached the upstream (its open streams drop to 0); descriptors return to the "
      "count before the load once idle upstream connections expire; RSS is flat (last third at most "
      "max(2 MiB, 10%) above the middle third).")
w("")

w("## Fuzzing")
w("")
if fuzz:
    w("`fuzz/run.sh` (cargo-fuzz, libFuzzer, stable toolchain with `RUSTC_BOOTSTRAP=1`, no sanitizer, "
      "debug assertions on). `request_headers` checks header rewriting, upgrade detection, the Host and "
      "path policies, Baseten path mapping and route targets against independent statements of their "
      "rules; `config_toml` loads fuzzed config files and checks that it never panics, that every error "
      f"names a setting and that no secret appears in errors or Debug output. Fuzz exit status: {fuzz_status}.")
    w("")
    w(table(["target", "executions", "seconds", "executions/s", "corpus entries", "failing inputs",
             "distinct failures"],
            [[f[0], f"{int(f[1]):,}", f[2], f[3], f[4], f[5], f[6]] for f in fuzz]))
    failures = [(f[0], item.strip(), f[8] if len(f) > 8 else "") for f in fuzz
                for item in (f[7] if len(f) > 7 else "").split(";") if item.strip()]
    if failures:
        w("")
        w("Failures, grouped by where the target's check failed (each failing input replayed):")
        w("")
        w(table(["target", "count and failure", "one failing input (kept locally under fuzz/, not committed)"],
                [[t, item, example] for t, item, example in failures], (2,)))
else:
    w("Not run in this report (RELIABILITY_SKIP_FUZZ=1).")
w("")
w("## Test verdicts")
w("")
w(table(["test", "verdict"], [[name, verdict] for name, verdict in sorted(verdicts)], (0,)))
w("")
open(out, "w", encoding="utf-8").write("\n".join(doc))
PYTHON
log "done: $OUT (tests exit $TESTS_STATUS, soak exit $SOAK_STATUS, fuzz exit $FUZZ_STATUS)"
