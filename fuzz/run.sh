#!/usr/bin/env bash
# Runs keyrelay's fuzz targets for a bounded time each and prints what they did.
#
#   fuzz/run.sh                    every target, FUZZ_SECONDS each (default 60)
#   fuzz/run.sh config_toml        one target
#   FUZZ_SECONDS=600 fuzz/run.sh   longer
#
# Targets (fuzz/fuzz_targets/):
#   request_headers  header rewriting, upgrade detection, Host and path
#                    policies, Baseten path mapping and route targets on
#                    requests built from fuzzed method, URI and headers
#   config_toml      config::load on a fuzzed TOML file with a fixed environment
#
# It installs cargo-fuzz when missing (`cargo install cargo-fuzz`), builds the
# targets once (the stable toolchain with RUSTC_BOOTSTRAP=1, since cargo-fuzz
# passes -Z flags; no sanitizer: keyrelay forbids unsafe code, and the
# targets check invariants, not memory), then runs each one. The corpus grows
# in fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET, and config/*.toml for
# config_toml);
# crashes land in fuzz/artifacts/TARGET. The build uses one job
# (CARGO_BUILD_JOBS to change it): about 5 minutes the first time.
#
# Output: libFuzzer's log in fuzz/target/fuzz-TARGET.log, and one line per
# target on stdout,
#   FUZZ|target|executions|seconds|execs/s|corpus entries|finding inputs|distinct failures|failures|example input
# where the failures are "COUNTx panicked at FILE:LINE: first line of the message",
# found by replaying every new finding input.
# (also appended to $FUZZ_OUT when set; bench/reliability.sh uses that).
# libFuzzer runs in fork mode with one worker (-fork=1 -ignore_crashes=1), so
# it keeps going after a finding. Exit status 1 when a target found something:
# minimise it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz tmin -s none TARGET fuzz/artifacts/TARGET/FILE
# and turn it into a regression test in tests/.
set -euo pipefail
export LC_ALL=C

FUZZ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$FUZZ_DIR")
cd "$FUZZ_DIR"
SECONDS_EACH=${FUZZ_SECONDS:-60}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(request_headers config_toml)

log() { printf '[fuzz %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only -Z flags; the stable compiler takes them with this.
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
FUZZ_FLAGS=(-s none --debug-assertions)

log "building the fuzz targets (release, debug assertions, no sanitizer)"
nice cargo fuzz build "${FUZZ_FLAGS[@]}" >&2

# The config dictionary: every setting and route key, from the sources.
mkdir -p target
{
  # Wherever under src/config/ they live (settings.rs, routes/mod.rs today).
  grep -rho 'key: "[a-z_0-9]*"' "$ROOT/src/config" | sed 's/key: //'
  grep -rl '^pub(super) struct RawRoute' "$ROOT/src/config" |
    xargs sed -n '/^pub(super) struct RawRoute/,/^}/p' |
    grep -o '^    [a-z_0-9]*:' | tr -d ' :' | sed 's/.*/"&"/'
  printf '%s\n' '"[[routes]]"' '" = "' '"true"' '"false"' '"\"https://"' '"\"http://"' \
    '"\"yes\""' '"\"off\""' '"\"1\""' '"regional = true"' '"allowed_paths = [\""' \
    '"{key}"' '"off"' '"ms"' '"KiB"' '"MiB"' '"/m"' '"127.0.0.1:"' '"BASETEN_API_KEY"' \
    '"LLAMA_KEY"' '"FRONTEND_TOKEN"' '"prefix = \"/"' '"[\""' '"\"]"'
} | sort -u >target/config_toml.dict

status=0
for target in "${TARGETS[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  before=$(find "artifacts/$target" -type f | sort)
  # libFuzzer writes new inputs to the first directory only; the others seed it.
  dirs=("corpus/$target")
  [ -d "seeds/$target" ] && dirs+=("seeds/$target")
  [ "$target" = config_toml ] && dirs+=("$ROOT/config")
  dict=()
  case "$target" in
    config_toml) dict=(-dict=target/config_toml.dict) ;;
    request_headers) dict=(-dict=request_headers.dict) ;;
  esac
  logfile=target/fuzz-$target.log
  log "running $target for ${SECONDS_EACH}s (log: fuzz/$logfile)"
  started=$SECONDS
  run_status=0
  # -fork=1 -ignore_crashes=1: one worker process that keeps fuzzing after a
  # finding (so a known, unfixed bug does not end the run in a second);
  # -timeout: one input taking 10 s is a finding (a hang); -rss_limit_mb likewise.
  nice cargo fuzz run "${FUZZ_FLAGS[@]}" "$target" "${dirs[@]}" -- \
    -max_total_time="$SECONDS_EACH" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    "${dict[@]}" >"$logfile" 2>&1 || run_status=$?
  elapsed=$((SECONDS - started))
  # Fork mode's status lines: `#EXECS: cov: ... oom/timeout/crash: O/T/C ...`.
  execs=$(grep -o '^#[0-9]*' "$logfile" | tail -1 | tr -d '#')
  rate=$(awk -v e="${execs:-0}" -v s="$elapsed" 'BEGIN { printf "%.0f", (s > 0 ? e / s : 0) }')
  corpus=$(find "corpus/$target" -type f | wc -l)
  new=$(comm -13 <(echo "$before") <(find "artifacts/$target" -type f -name 'crash-*' -o \
    -type f -name 'timeout-*' -o -type f -name 'oom-*' | sort) | grep -v '^$' || true)
  findings=$(printf '%s' "$new" | grep -c . || true)
  # Group the finding inputs by where they fail: replay each (fast), group by
  # the panic location, and keep the first message seen for each location.
  distinct=""
  if [ "$findings" -gt 0 ]; then
    status=1
    binary=target/x86_64-unknown-linux-gnu/release/$target
    distinct=$(for file in $new; do
      "$binary" "$file" 2>&1 | grep -m1 -A1 'panicked at' | tr '\n' ' ' |
        sed -E 's/^.*panicked at ([^ ]*): (.*)$/\1\t\2/; s/ +$//' | cut -c1-260
      echo
    done | sed '/^$/d' | awk -F '\t' '
      !($1 in count) { order[++n] = $1; first[$1] = $2 }
      { count[$1]++ }
      END { for (i = 1; i <= n; i++) printf "%dx at %s: %s\n", count[order[i]], order[i], first[order[i]] }')
    log "$target: $findings finding inputs (exit $run_status); by failure:"
    echo "$distinct" >&2
  elif [ "$run_status" != 0 ]; then
    status=1
    log "$target: exit $run_status without a finding; see fuzz/$logfile"
  fi
  kinds=$(printf '%s' "$distinct" | grep -c . || true)
  example=$(printf '%s' "$new" | head -1)
  line="FUZZ|$target|${execs:-0}|$elapsed|$rate|$corpus|$findings|$kinds|$(printf '%s' "$distinct" | tr '\n' ';' | sed 's/|/\\|/g')|$example"
  echo "$line"
  [ -n "${FUZZ_OUT:-}" ] && echo "$line" >>"$FUZZ_OUT"
done
exit "$status"
