#!/usr/bin/env python3
"""Reads one trace back from the receiver's query API and checks the span
keyrelay exported for a streamed chat request (tests/traces/run.sh).

    check.py --query URL --upstream URL --trace ID --caller-span ID \
             --service NAME --key KEY --protocol P --collector-header NAME=VALUE \
             [--case streamed|retried|failed] [--wait SECONDS] [--render FILE]

--case says what the request met: `streamed` (the default) a stream with
usage, `retried` a 503 then that stream, `failed` a 503 on each of its 3
attempts. --wait 0 asks for the trace at once (the drain case: keyrelay
has exited, so the span must already be there). Prints one `ok:` line per property;
the first failure exits non-zero with what was found. Standard library only.
"""

import argparse
import base64
import json
import sys
import time
import urllib.error
import urllib.request


def fail(message, *details):
    sys.stderr.write(f"FAIL: {message}\n")
    for detail in details:
        sys.stderr.write(f"{detail}\n")
    sys.exit(1)


def ok(message):
    print(f"ok: {message}", flush=True)


def get(url):
    """(status, body) of a GET; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err)


def main():
    parser = argparse.ArgumentParser()
    for name in ("query", "upstream", "trace", "caller-span", "service", "key", "protocol", "collector-header"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--case", choices=("streamed", "retried", "failed"), default="streamed")
    parser.add_argument("--wait", type=float, default=10.0)
    parser.add_argument("--render")
    args = parser.parse_args()

    # 1. The trace, queried back (waiting for the batch delay, at most --wait).
    url = f"{args.query}/api/traces/{args.trace}"
    deadline = time.monotonic() + args.wait
    while True:
        status, body = get(url)
        if status == 200 or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if status != 200:
        _, exports = get(f"{args.query}/api/exports")
        try:
            received = [f"{e['protocol']}: {e['spans']} span(s) of {e['trace_ids']}" for e in json.loads(exports)]
        except ValueError:
            received = [exports[:500]]
        fail(
            f"no trace {args.trace} in the receiver" + (f" within {args.wait:g} s" if args.wait else ""),
            f"GET {url}: {status} {body}",
            "exports received so far:",
            *received,
        )
    answer = json.loads(body)
    spans = answer["data"][0]["spans"]
    if len(spans) != 1:
        fail(f"{len(spans)} spans in the trace, not 1", json.dumps(spans, indent=1))
    span = spans[0]
    tags = {tag["key"]: tag["value"] for tag in span["tags"]}
    ok(f"the trace came back from the query API: one span, {span['operationName']!r}, over {tags['otlp.protocol']}")
    if tags["otlp.protocol"] != args.protocol:
        fail(f"the span came over {tags['otlp.protocol']}, not {args.protocol}")
    if span["warnings"]:
        fail("the official decoder found what it does not know", *span["warnings"])
    ok("the official decoder (opentelemetry-proto) read every field: no unknown fields, ids of 16 and 8 bytes")

    # 2. Its place in the trace: the caller's child, the upstream's parent.
    parents = [ref["spanID"] for ref in span["references"] if ref["refType"] == "CHILD_OF"]
    if parents != [args.caller_span]:
        fail(f"parent {parents}, not the caller's span {args.caller_span}", json.dumps(span["references"]))
    if tags.get("span.kind") != "server":
        fail(f"span kind {tags.get('span.kind')!r}, not server")
    ok(f"a SERVER span, child of the caller's span {args.caller_span}")
    _, seen = get(f"{args.upstream}/seen")
    attempts = {"streamed": 1, "retried": 2, "failed": 3}[args.case]
    mine = [request for request in json.loads(seen) if any(args.trace in value for value in request["traceparent"])]
    if len(mine) != attempts:
        fail(f"{len(mine)} upstream requests in trace {args.trace}, not {attempts}", seen)
    expected = f"00-{args.trace}-{span['spanID']}-01"
    for request in mine:
        if request["traceparent"] != [expected]:
            fail(f"the upstream got traceparent {request['traceparent']}, not {expected}")
        if not request["authorized"]:
            fail("the upstream did not get the key")
    ok(f"the upstream got traceparent {expected} on each of {attempts} attempt(s): keyrelay's span id")

    # 3. What the span says.
    expected_tags = {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 503 if args.case == "failed" else 200,
        "keyrelay.route": "default",
        "keyrelay.outcome": "ok",
        "keyrelay.upstream.address": "127.0.0.1",
        "url.scheme": "http",
        "gen_ai.operation.name": "chat",
    }
    if args.case == "failed":
        # Relayed as the upstream answered it after the last attempt: a
        # server error, so an error span.
        expected_tags.update({"otel.status_code": "ERROR", "error.type": "503", "keyrelay.attempts": 3})
    else:
        expected_tags.update({"gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 2})
    if args.case == "retried":
        expected_tags["keyrelay.attempts"] = 2
    for key, value in expected_tags.items():
        if tags.get(key) != value:
            fail(f"attribute {key} is {tags.get(key)!r}, not {value!r}", json.dumps(span["tags"], indent=1))
    events = [next(f["value"] for f in log["fields"] if f["key"] == "event") for log in span["logs"]]
    for log in span["logs"]:
        if not span["startTime"] <= log["timestamp"] <= span["startTime"] + span["duration"]:
            fail("an event outside the span", json.dumps(log))
    summary = ", ".join(f"{k}={v}" for k, v in expected_tags.items())
    if args.case == "failed":
        if "otel.status_description" not in tags:
            fail("an error span without a status message")
    else:
        ttft = tags.get("keyrelay.time_to_first_token")
        if not isinstance(ttft, float) or not 0.03 < ttft < span["duration"] / 1e6:
            fail(f"keyrelay.time_to_first_token is {ttft!r}; the upstream's first token came after 40 ms")
        if "first_token" not in events:
            fail(f"no first_token event: {events}")
        summary += f", time to first token {ttft * 1000:.1f} ms"
    retries = [
        {f["key"]: f["value"] for f in log["fields"]}
        for log in span["logs"]
        if {"key": "event", "type": "string", "value": "retry"} in log["fields"]
    ]
    if len(retries) != attempts - 1:
        fail(f"{len(retries)} retry events for {attempts} attempts", json.dumps(span["logs"], indent=1))
    for retry in retries:
        if retry.get("http.response.status_code") != 503 or retry.get("keyrelay.next_route") != "default":
            fail(f"a retry event that does not say what was retried: {retry}")
    ok(f"attributes: {summary}; events {events}")
    process = answer["data"][0]["processes"][span["processID"]]
    if process["serviceName"] != args.service:
        fail(f"service.name is {process['serviceName']!r}, not {args.service!r}")
    resource = {tag["key"]: tag["value"] for tag in process["tags"]}
    # OTEL_RESOURCE_ATTRIBUTES, percent-decoded (the comma in a value is
    # how it is written), its service.name overridden by OTEL_SERVICE_NAME.
    wanted = {"deployment.environment.name": "ci", "service.namespace": "key,relay"}
    if resource != wanted:
        fail(f"the resource is {resource}, not {wanted} from OTEL_RESOURCE_ATTRIBUTES")
    ok(f"resource: service.name={args.service} (OTEL_SERVICE_NAME), {resource} (OTEL_RESOURCE_ATTRIBUTES)")

    # 4. The export itself: the collector's header arrived, the key nowhere.
    _, exports_body = get(f"{args.query}/api/exports")
    exports = [e for e in json.loads(exports_body) if e["protocol"] == args.protocol]
    header, value = args.collector_header.split("=", 1)
    if not exports or any(e["headers"].get(header) != value for e in exports):
        fail(f"not every {args.protocol} export carried {header} (OTEL_EXPORTER_OTLP_HEADERS)",
             json.dumps([e["headers"] for e in exports]))
    key = args.key.encode()
    for export in exports:
        if key in base64.b64decode(export["body_base64"]) or args.key in json.dumps(export["headers"]):
            fail(f"the upstream key is in an export's bytes or headers ({export['protocol']})")
    if args.key in body:
        fail("the upstream key is in the trace the query API returned")
    ok(f"{len(exports)} {args.protocol} export(s) carried {header}; the key is in no byte or header of any")

    if args.render:
        status, text = get(f"{url}/text")
        if status != 200:
            fail(f"GET {url}/text: {status} {text}")
        with open(args.render, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
