#!/usr/bin/env python3
"""keyrelay's Google credentials, checked by Google's own auth library.

    python check.py KEYRELAY_BINARY

1. Service-account key file. A key and a certificate are made here
   (cryptography), and a key file whose token_uri points at a token
   endpoint here. The endpoint verifies each assertion with google-auth's
   own google.auth.jwt.decode against the certificate (the RS256
   signature, iat and exp, aud = token_uri), then checks iss, scope, kid
   and the hour's lifetime, and issues a token. It first serves
   google-auth's own service_account.Credentials (so it accepts what
   Google's library sends), then keyrelay's: a request through keyrelay
   (provider = "vertex") reaches a recording upstream with
   "Bearer <the token issued>".
2. A key the endpoint does not trust: keyrelay exits 64 naming
   google_credentials_file and invalid_grant, and its output holds no line
   of the private key.
3. Metadata server. A fake at GCE_METADATA_HOST records what google-auth's
   compute_engine.Credentials asks and what keyrelay asks: the same GET
   (path, scopes, Metadata-Flavor: Google); one without the header is
   refused, and keyrelay's request upstream carries the token served.
"""

import datetime
import importlib
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import google.auth.jwt
import google.auth.transport.requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.oauth2 import service_account

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
EMAIL = "keyrelay-check@keyrelay-check.iam.gserviceaccount.com"
KEY_ID = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
METADATA_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
STEP = 20


def fail(message):
    sys.stderr.write(f"tests/google_auth/check.py: FAILED: {message}\n")
    sys.exit(1)


def make_key():
    """An RSA key, its PKCS#8 PEM and a self-signed certificate, as Google
    publishes service-account keys' certificates."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, EMAIL)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


def answer(handler, status, body, headers=()):
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def token_endpoint(cert_pem, audience_box):
    """A token endpoint verifying assertions with google-auth against
    `cert_pem`, for the audience in `audience_box`; its record: (verified
    claims or the refusal, token)."""
    seen = []

    class Handler(Quiet):
        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            try:
                if form.get("grant_type") != [JWT_BEARER]:
                    raise ValueError(f"grant_type {form.get('grant_type')}")
                (assertion,) = form["assertion"]
                header = google.auth.jwt.decode_header(assertion)
                claims = google.auth.jwt.decode(
                    assertion, certs={KEY_ID: cert_pem}, audience=audience_box[0]
                )
                if header.get("alg") != "RS256" or header.get("kid") != KEY_ID:
                    raise ValueError(f"header {header}")
                if claims["iss"] != EMAIL or claims["scope"] != SCOPE:
                    raise ValueError(f"claims {claims}")
                if claims["exp"] - claims["iat"] != 3600:
                    raise ValueError(f"lifetime {claims}")
            except Exception as err:  # every refusal is recorded and answered
                seen.append((f"refused: {err}", None))
                answer(self, 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
                return
            token = f"ga-token-{len(seen) + 1}"
            seen.append((claims, token))
            answer(self, 200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    return Handler, seen


def metadata_server():
    """A metadata server that refuses requests without Metadata-Flavor:
    Google, as the real one does, and like it says Metadata-Flavor: Google
    on every answer (google-auth and keyrelay check it); its record: (path
    and query, flavor)."""
    seen = []
    flavor_header = [("Metadata-Flavor", "Google")]

    class Handler(Quiet):
        def do_GET(self):
            flavor = self.headers.get("Metadata-Flavor")
            seen.append((self.path, flavor))
            if flavor != "Google":
                answer(self, 403, {"error": "Missing Metadata-Flavor:Google header."}, flavor_header)
                return
            path = urllib.parse.urlsplit(self.path).path
            if path == METADATA_PATH.removesuffix("token"):
                # google-auth asks who the account is first, then asks for
                # that account's token by the name answered here.
                answer(self, 200, {"email": "default", "aliases": ["default"], "scopes": [SCOPE]}, flavor_header)
                return
            if path != METADATA_PATH:
                answer(self, 404, {"error": "not found"}, flavor_header)
                return
            answer(
                self,
                200,
                {"access_token": f"md-token-{len(seen)}", "expires_in": 3599, "token_type": "Bearer"},
                flavor_header,
            )

    return Handler, seen


def recording_upstream():
    seen = []

    class Handler(Quiet):
        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            self.rfile.read(length)
            seen.append((self.path, self.headers.get("authorization")))
            answer(self, 200, {"ok": True})

    return Handler, seen


def keyrelay(binary, args, env):
    """Starts keyrelay; its address, the process and its output so far."""
    process = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--provider", "vertex", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = queue.Queue()
    output = []
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)], daemon=True).start()
    deadline = time.monotonic() + STEP
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            break
        output.append(line)
        found = re.search(r"keyrelay ready listen=(\S+)", line)
        if found:
            threading.Thread(target=lambda: [output.append(l) for l in iter(lines.get, None)], daemon=True).start()
            return found.group(1), process, output
    process.kill()
    fail("keyrelay did not start:\n" + "".join(output))


def through(address, path):
    request = urllib.request.Request(f"http://{address}{path}", data=b'{"contents": []}', method="POST")
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=STEP) as response:
        if response.status != 200:
            fail(f"keyrelay answered {response.status}")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=STEP)
    except subprocess.TimeoutExpired:
        process.kill()


def main():
    binary = sys.argv[1]
    env = {k: v for k, v in os.environ.items() if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "GCE_METADATA_HOST", "KEYRELAY_BIN")}
    env.update(RUST_LOG="trace", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    work = tempfile.mkdtemp(prefix="keyrelay-google-auth.")
    pem, cert = make_key()
    # google-auth always writes Google's own endpoint as the audience,
    # which is the token_uri of every key file Google issues; keyrelay (like
    # Go's x/oauth2) writes the file's token_uri, here a local one.
    audience_box = ["https://oauth2.googleapis.com/token"]
    handler, tokens = token_endpoint(cert, audience_box)
    _, token_host = serve(handler)
    token_uri = f"http://{token_host}/token"
    key_file = os.path.join(work, "sa.json")
    with open(key_file, "w") as f:
        json.dump({
            "type": "service_account", "project_id": "keyrelay-check",
            "private_key_id": KEY_ID, "private_key": pem, "client_email": EMAIL,
            "client_id": "1", "token_uri": token_uri,
        }, f)
    up_handler, upstream = recording_upstream()
    _, up_host = serve(up_handler)
    path = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini:generateContent"

    print("-- 1. google-auth's own service-account credentials pass the endpoint's checks")
    creds = service_account.Credentials.from_service_account_file(key_file, scopes=[SCOPE])
    try:
        creds.refresh(google.auth.transport.requests.Request())
    except Exception as err:
        fail(f"google-auth's refresh failed ({err}); the endpoint saw {tokens}")
    if creds.token != "ga-token-1":
        fail(f"google-auth got {creds.token!r}; the endpoint saw {tokens}")

    print("-- 1. keyrelay's assertion passes google.auth.jwt.decode; the upstream sees the token issued")
    audience_box[0] = token_uri
    address, process, output = keyrelay(
        binary, ["--upstream", f"http://{up_host}", "--google-credentials-file", key_file], env
    )
    through(address, path)
    stop(process)
    claims, token = tokens[-1]
    if token != "ga-token-2":
        fail(f"keyrelay's assertion: {claims}")
    if upstream != [(path, "Bearer ga-token-2")]:
        fail(f"the upstream saw {upstream}")
    print(f"   verified claims: iss={claims['iss']} aud={claims['aud']} scope={claims['scope']}")

    print("-- 2. a key the endpoint does not trust: exit 64, the key never printed")
    other_pem, _ = make_key()
    other_file = os.path.join(work, "other.json")
    with open(other_file, "w") as f:
        json.dump({"type": "service_account", "private_key_id": KEY_ID, "private_key": other_pem,
                   "client_email": EMAIL, "token_uri": token_uri}, f)
    run = subprocess.run(
        [binary, "--listen", "127.0.0.1:0", "--provider", "vertex", "--upstream", f"http://{up_host}",
         "--google-credentials-file", other_file],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=STEP,
    )
    said = run.stdout + run.stderr
    if run.returncode != 64 or "google_credentials_file" not in said or "invalid_grant" not in said:
        fail(f"exit {run.returncode}:\n{said}")
    if not tokens[-1][0].startswith("refused: "):
        fail(f"the endpoint did not refuse: {tokens[-1]}")
    for line in (pem + other_pem).splitlines():
        if not line.startswith("-----") and line in said:
            fail("the private key reached keyrelay's output")

    print("-- 3. the metadata server: keyrelay asks what google-auth asks")
    md_handler, asked = metadata_server()
    _, md_host = serve(md_handler)
    bare = urllib.request.Request(f"http://{md_host}{METADATA_PATH}")
    try:
        urllib.request.urlopen(bare, timeout=STEP)
        fail("the metadata server answered a request without Metadata-Flavor")
    except urllib.error.HTTPError as refused:
        if refused.code != 403:
            fail(f"the metadata server answered {refused.code} without Metadata-Flavor")
    # google-auth reads the variable when the module is imported.
    os.environ["GCE_METADATA_HOST"] = md_host
    compute_engine = importlib.import_module("google.auth.compute_engine")
    google_creds = compute_engine.Credentials(scopes=[SCOPE])
    google_creds.refresh(google.auth.transport.requests.Request())
    google_asked = [a for a in asked[1:] if urllib.parse.urlsplit(a[0]).path == METADATA_PATH]
    if not google_asked:
        fail(f"google-auth asked {asked}")
    upstream.clear()
    md_env = dict(env, GCE_METADATA_HOST=md_host)
    before = len(asked)
    address, process, output = keyrelay(binary, ["--upstream", f"http://{up_host}"], md_env)
    through(address, path)
    stop(process)
    keyrelay_asked = asked[before:]
    if len(keyrelay_asked) != 1:
        fail(f"keyrelay asked {keyrelay_asked}")
    if keyrelay_asked[0] != google_asked[-1]:
        fail(f"keyrelay asked {keyrelay_asked[0]}, google-auth {google_asked[-1]}")
    token = f"md-token-{before + 1}"
    if upstream != [(path, f"Bearer {token}")]:
        fail(f"the upstream saw {upstream}")
    log = "".join(output)
    for secret in ("ga-token-", "md-token-", "eyJhbGciOiJSUzI1NiI"):
        if secret in log:
            fail(f"{secret} reached keyrelay's trace log")
    print(f"   both asked GET {keyrelay_asked[0][0]} with Metadata-Flavor: {keyrelay_asked[0][1]}")
    print("google-auth checks: 3 passed, 0 failed")


if __name__ == "__main__":
    main()
