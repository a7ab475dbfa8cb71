#!/usr/bin/env python3
"""An OTLP trace receiver built on the official protobuf definitions
(`opentelemetry-proto` from PyPI), with a query API to read traces back.
What tests/traces/run.sh exports keyrelay's spans to, where Jaeger or the
OpenTelemetry Collector cannot be built (no Go toolchain or module proxy).

    receiver.py            # serves; prints `listening http=HOST:PORT grpc=HOST:PORT`
    receiver.py render TRACE.json   # a query answer as text, as GET .../text does

Receives:
- OTLP/HTTP: `POST /v1/traces`, `application/x-protobuf`, decoded with
  `ExportTraceServiceRequest` (400 when it does not decode);
- OTLP/gRPC: `TraceService/Export` (grpcio, plaintext HTTP/2), served by a
  `TraceServiceServicer` from `trace_service_pb2_grpc`.

Query API, on the HTTP port:
- `GET /api/traces/TRACE_ID`: the trace as Jaeger's query API answers it
  (`{"data": [{"traceID", "spans": [...], "processes": {...}}]}`; span
  kind as the `span.kind` tag, events as `logs`), 404 when no span of it
  arrived. Each span's `warnings` list what an official decoder found odd:
  fields it does not know (a wrong field number in the sender's encoder),
  ids of the wrong length, an end before the start.
- `GET /api/traces/TRACE_ID/text`: the same trace as a text tree.
- `GET /api/exports`: each export received: protocol, path, content
  type, request headers (gRPC metadata), span count and the message's
  bytes (base64), so a test can scan them for what must not be there.
"""

import base64
import http.server
import json
import sys
import threading
from concurrent import futures

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf.unknown_fields import UnknownFieldSet
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

# Jaeger's names for OTLP's span kinds.
KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "unspecified",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}
MAX_BODY = 16 * 1024 * 1024


class Store:
    """Every span received, with its resource and scope; every export."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans = []  # (resource, scope, span, protocol)
        self.exports = []

    def add(self, request, protocol, path, content_type, headers, raw):
        count = 0
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((resource_spans, scope_spans, span, protocol))
                        count += 1
            self.exports.append(
                {
                    "protocol": protocol,
                    "path": path,
                    "content_type": content_type,
                    "headers": headers,
                    "spans": count,
                    "trace_ids": sorted(
                        {span.trace_id.hex() for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans}
                    ),
                    "unknown_fields": unknown_fields(request),
                    "body_base64": base64.b64encode(raw).decode(),
                }
            )

    def trace(self, trace_id):
        with self.lock:
            return [entry for entry in self.spans if entry[2].trace_id.hex() == trace_id]

    def export_log(self):
        with self.lock:
            return list(self.exports)


STORE = Store()


def unknown_fields(message, path=None):
    """The fields of `message` and its sub-messages the definitions lack,
    as `where: field N`."""
    path = path or message.DESCRIPTOR.name
    found = []
    unknown = UnknownFieldSet(message)
    for index in range(len(unknown)):
        found.append(f"{path}: field {unknown[index].field_number}")
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        # A message, or a repeated field of them.
        values = [value] if isinstance(value, protobuf_message.Message) else value
        for index, item in enumerate(values):
            if isinstance(item, protobuf_message.Message):
                found += unknown_fields(item, f"{path}.{field.name}[{index}]")
    return found


# ---- the Jaeger-style JSON ----------------------------------------------


def any_value(value):
    """An AnyValue as Jaeger's (type, value)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return "string", value.string_value
    if kind == "bool_value":
        return "bool", value.bool_value
    if kind == "int_value":
        return "int64", value.int_value
    if kind == "double_value":
        return "float64", value.double_value
    if kind == "bytes_value":
        return "binary", base64.b64encode(value.bytes_value).decode()
    if kind == "array_value":
        return "string", json.dumps([any_value(item)[1] for item in value.array_value.values])
    if kind == "kvlist_value":
        return "string", json.dumps({kv.key: any_value(kv.value)[1] for kv in value.kvlist_value.values})
    return "string", ""


def tags(attributes):
    out = []
    for attribute in attributes:
        kind, value = any_value(attribute.value)
        out.append({"key": attribute.key, "type": kind, "value": value})
    return out


def warnings_of(span):
    found = [f"unknown {field}" for field in unknown_fields(span, "span")]
    if len(span.trace_id) != 16:
        found.append(f"trace_id is {len(span.trace_id)} bytes, not 16")
    if len(span.span_id) != 8:
        found.append(f"span_id is {len(span.span_id)} bytes, not 8")
    if span.parent_span_id and len(span.parent_span_id) != 8:
        found.append(f"parent_span_id is {len(span.parent_span_id)} bytes, not 8")
    if span.end_time_unix_nano < span.start_time_unix_nano:
        found.append("ends before it starts")
    return found


def jaeger_trace(trace_id, entries):
    processes = {}
    spans = []
    for resource_spans, scope_spans, span, protocol in entries:
        resource = tags(resource_spans.resource.attributes)
        service = next((t["value"] for t in resource if t["key"] == "service.name"), "unknown_service")
        process = {"serviceName": service, "tags": [t for t in resource if t["key"] != "service.name"]}
        process_id = next((pid for pid, known in processes.items() if known == process), None)
        if process_id is None:
            process_id = f"p{len(processes) + 1}"
            processes[process_id] = process
        span_tags = tags(span.attributes)
        span_tags.append({"key": "span.kind", "type": "string", "value": KINDS.get(span.kind, str(span.kind))})
        if span.status.code != trace_pb2.Status.STATUS_CODE_UNSET:
            code = trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_")
            span_tags.append({"key": "otel.status_code", "type": "string", "value": code})
            if span.status.message:
                span_tags.append(
                    {"key": "otel.status_description", "type": "string", "value": span.status.message}
                )
        if span.trace_state:
            span_tags.append({"key": "w3c.tracestate", "type": "string", "value": span.trace_state})
        span_tags.append({"key": "otel.scope.name", "type": "string", "value": scope_spans.scope.name})
        span_tags.append({"key": "otel.scope.version", "type": "string", "value": scope_spans.scope.version})
        span_tags.append({"key": "otlp.protocol", "type": "string", "value": protocol})
        references = []
        if span.parent_span_id:
            references.append(
                {"refType": "CHILD_OF", "traceID": span.trace_id.hex(), "spanID": span.parent_span_id.hex()}
            )
        spans.append(
            {
                "traceID": span.trace_id.hex(),
                "spanID": span.span_id.hex(),
                "operationName": span.name,
                "references": references,
                "flags": span.flags,
                "startTime": span.start_time_unix_nano // 1000,
                "duration": (span.end_time_unix_nano - span.start_time_unix_nano) // 1000,
                "tags": span_tags,
                "logs": [
                    {
                        "timestamp": event.time_unix_nano // 1000,
                        "fields": [{"key": "event", "type": "string", "value": event.name}]
                        + tags(event.attributes),
                    }
                    for event in span.events
                ],
                "processID": process_id,
                "warnings": warnings_of(span),
            }
        )
    spans.sort(key=lambda span: span["startTime"])
    return {"data": [{"traceID": trace_id, "spans": spans, "processes": processes}], "errors": None}


# ---- the text rendering ---------------------------------------------------


def show_value(tag):
    if tag["type"] == "string":
        return json.dumps(tag["value"])
    if tag["type"] == "float64":
        return f"{tag['value']:.6g}"
    return tag["value"]


def render(answer):
    """A query answer as a text tree: service, span, duration, attributes."""
    trace = answer["data"][0]
    spans = trace["spans"]
    ids = {span["spanID"] for span in spans}
    children = {}
    roots = []
    for span in spans:
        parent = next((ref["spanID"] for ref in span["references"] if ref["refType"] == "CHILD_OF"), None)
        if parent in ids:
            children.setdefault(parent, []).append(span)
        else:
            roots.append((parent, span))
    start = min(span["startTime"] for span in spans)
    count = f"{len(spans)} span" + ("" if len(spans) == 1 else "s")
    lines = [f"trace {trace['traceID']} ({count})"]

    def milliseconds(microseconds):
        return f"{microseconds / 1000:.1f} ms"

    def show(span, depth):
        pad = "   " * depth
        process = trace["processes"][span["processID"]]
        tag = {t["key"]: t for t in span["tags"]}
        kind = tag.get("span.kind", {}).get("value", "")
        lines.append(
            f"{pad}└─ {process['serviceName']}: {span['operationName']} ({kind}), "
            f"{milliseconds(span['duration'])}, from +{milliseconds(span['startTime'] - start)}"
        )
        lines.append(f"{pad}     span {span['spanID']}")
        shown = [t for t in span["tags"] if t["key"] not in ("span.kind", "otlp.protocol")]
        width = max((len(t["key"]) for t in shown), default=0)
        for t in shown:
            value = show_value(t)
            lines.append(f"{pad}     {t['key'].ljust(width)}  {value}")
        for log in span["logs"]:
            name = next((f["value"] for f in log["fields"] if f["key"] == "event"), "")
            extra = " ".join(f"{f['key']}={show_value(f)}" for f in log["fields"] if f["key"] != "event")
            offset = milliseconds(log["timestamp"] - span["startTime"])
            lines.append(f"{pad}     event +{offset:>9}  {name} {extra}".rstrip())
        for warning in span["warnings"]:
            lines.append(f"{pad}     WARNING {warning}")
        for child in children.get(span["spanID"], []):
            show(child, depth + 1)

    for parent, span in roots:
        if parent:
            lines.append(f"└─ (span {parent}: the caller's, not exported here)")
            show(span, 1)
        else:
            show(span, 0)
    for process in trace["processes"].values():
        resource = ", ".join(f"{t['key']}={t['value']}" for t in process["tags"])
        lines.append(f"resource: service.name={process['serviceName']}" + (f", {resource}" if resource else ""))
    return "\n".join(lines) + "\n"


# ---- OTLP/HTTP and the query API ------------------------------------------


class Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if self.headers.get("transfer-encoding") or length > MAX_BODY:
            # Enough for keyrelay, which sends each batch with its length.
            self.answer(411, "text/plain", b"a body with a content-length up to 16 MiB\n")
            self.close_connection = True
            return
        raw = self.rfile.read(length)
        if self.path != "/v1/traces":
            self.answer(404, "text/plain", b"OTLP/HTTP traces go to /v1/traces\n")
            return
        content_type = self.headers.get("content-type", "")
        if content_type != "application/x-protobuf":
            self.answer(415, "text/plain", b"only application/x-protobuf\n")
            return
        if self.headers.get("content-encoding", "identity") != "identity":
            self.answer(415, "text/plain", b"not compressed, please\n")
            return
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        except protobuf_message.DecodeError as err:
            self.answer(400, "text/plain", f"not an ExportTraceServiceRequest: {err}\n".encode())
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        STORE.add(request, "http/protobuf", self.path, content_type, headers, raw)
        response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.answer(200, "application/x-protobuf", response)

    def do_GET(self):
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if parts == ["api", "exports"]:
            self.answer(200, "application/json", json.dumps(STORE.export_log()).encode())
        elif len(parts) in (3, 4) and parts[:2] == ["api", "traces"]:
            trace_id = parts[2].lower()
            entries = STORE.trace(trace_id)
            if not entries:
                body = {"data": None, "errors": [{"code": 404, "msg": "trace not found"}]}
                self.answer(404, "application/json", json.dumps(body).encode())
            elif len(parts) == 3:
                self.answer(200, "application/json", json.dumps(jaeger_trace(trace_id, entries)).encode())
            elif parts[3] == "text":
                self.answer(200, "text/plain; charset=utf-8", render(jaeger_trace(trace_id, entries)).encode())
            else:
                self.answer(404, "text/plain", b"no such view\n")
        else:
            self.answer(404, "text/plain", b"not found\n")

    def answer(self, status, content_type, body):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


# ---- OTLP/gRPC --------------------------------------------------------------


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        headers = {key: value for key, value in context.invocation_metadata()}
        STORE.add(
            request,
            "grpc",
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            "application/grpc",
            headers,
            request.SerializeToString(),
        )
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "render":
        with open(sys.argv[2]) as f:
            sys.stdout.write(render(json.load(f)))
        return
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Http)
    http_server.daemon_threads = True
    print(f"listening http=127.0.0.1:{http_server.server_address[1]} grpc=127.0.0.1:{grpc_port}", flush=True)
    try:
        http_server.serve_forever()
    finally:
        grpc_server.stop(0)


if __name__ == "__main__":
    main()
