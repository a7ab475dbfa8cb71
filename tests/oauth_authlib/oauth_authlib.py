"""keyrelay's OAuth2 client credentials against Authlib's authorization server.

Usage: oauth_authlib.py KEYRELAY_BINARY

One process runs, each on a free loopback port:

- the authorization server: Authlib's `AuthorizationServer` with its
  `ClientCredentialsGrant`, authenticating one client by
  client_secret_basic and issuing Bearer tokens that live EXPIRES_IN
  seconds (Authlib's `BearerTokenGenerator`);
- the model upstream: every request's token goes through Authlib's
  `ResourceProtector` with a `BearerTokenValidator`, which refuses a token
  that is unknown, expired (`is_expired`) or revoked with 401;
- keyrelay, with oauth_token_url pointed at the authorization server.

Each step prints what it proves; the first failure exits non-zero, and
every server and keyrelay are stopped on the way out. Every wait is bounded.
"""

import http.client
import http.server
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import unquote_plus

# The servers speak plain HTTP on 127.0.0.1; Authlib refuses that unless told.
os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"

from authlib.oauth2 import rfc6749  # noqa: E402
from authlib.oauth2.rfc6749 import grants  # noqa: E402
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload  # noqa: E402
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator  # noqa: E402

EXPIRES_IN = 3  # seconds; keyrelay refreshes at 80% of it
CLIENT_ID = "keyrelay-ci"
CLIENT_SECRET = "authlib-client-SECRET-" + secrets.token_hex(8)
SCOPE = "model:invoke"
STEP = 10.0  # the longest any one wait may take


def fail(message):
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def ok(message):
    print(f"ok: {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, probe, bound=STEP):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    fail(f"timed out after {bound} s waiting for {what}")


# ---------------------------------------------------------------------------
# The authorization server's models and Authlib's framework hooks
# ---------------------------------------------------------------------------


class Client(rfc6749.ClientMixin):
    def get_client_id(self):
        return CLIENT_ID

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return SCOPE if scope == SCOPE else ""

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        return secrets.compare_digest(client_secret, CLIENT_SECRET)

    def check_endpoint_auth_method(self, method, endpoint):
        return method == "client_secret_basic"

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == "client_credentials"


class Token(rfc6749.TokenMixin):
    def __init__(self, value, scope, expires_in):
        self.value = value
        self.scope = scope
        self.expires_in = expires_in
        self.issued_at = time.time()  # not rounded: expiry to the instant
        self.revoked = False

    def check_client(self, client):
        return client.get_client_id() == CLIENT_ID

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return self.expires_in

    def expires_at(self):
        return self.issued_at + self.expires_in

    def is_expired(self):
        return time.time() >= self.expires_at()

    def is_revoked(self):
        return self.revoked


class Store:
    """What both servers share: the tokens issued, in order, and counts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = {}
        self.issued = []  # Token objects in issue order
        self.token_requests = 0
        self.upstream_requests = 0
        self.accepted = 0
        self.expired_seen = 0
        self.rejected = []  # reasons

    def issued_count(self):
        with self.lock:
            return len(self.issued)


STORE = Store()


class AuthorizationServer(rfc6749.AuthorizationServer):
    """Authlib's server, hooked to http.server as a framework integration is."""

    def query_client(self, client_id):
        return Client() if client_id == CLIENT_ID else None

    def save_token(self, token, request):
        saved = Token(token["access_token"], token.get("scope", ""), token["expires_in"])
        with STORE.lock:
            STORE.tokens[saved.value] = saved
            STORE.issued.append(saved)

    def create_oauth2_request(self, request):
        return request

    def create_json_request(self, request):
        return request

    def handle_response(self, status, body, headers):
        return status, body, headers

    def send_signal(self, name, *args, **kwargs):
        pass


class FormRequest(rfc6749.OAuth2Request):
    """An OAuth2Request over a form-encoded body read by http.server."""

    def __init__(self, method, uri, headers, form):
        super().__init__(method, uri, headers=headers)
        self._form = form
        self.payload = BasicOAuth2Payload(form)

    @property
    def args(self):
        return {}

    @property
    def form(self):
        return self._form


def make_authorization_server():
    server = AuthorizationServer(scopes_supported=[SCOPE])
    server.register_grant(grants.ClientCredentialsGrant)
    server.register_token_generator(
        "default",
        BearerTokenGenerator(
            access_token_generator=lambda *args, **kwargs: "authlib-" + secrets.token_urlsafe(24),
            expires_generator=lambda client, grant_type: EXPIRES_IN,
        ),
    )
    return server


AUTHLIB = make_authorization_server()


class Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class TokenEndpoint(Quiet):
    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        body = self.rfile.read(length).decode()
        form = dict(
            pair.split("=", 1) if "=" in pair else (pair, "")
            for pair in body.split("&")
            if pair
        )
        form = {unquote_plus(k): unquote_plus(v) for k, v in form.items()}
        with STORE.lock:
            STORE.token_requests += 1
        request = FormRequest(
            "POST", f"http://{self.headers.get('host')}{self.path}", self.headers, form
        )
        status, payload, headers = AUTHLIB.create_token_response(request)
        self.reply(status, payload, headers)


class Validator(BearerTokenValidator):
    def authenticate_token(self, token_string):
        with STORE.lock:
            return STORE.tokens.get(token_string)


PROTECTOR = rfc6749.ResourceProtector()
PROTECTOR.register_token_validator(Validator())


class HeadersOnly:
    def __init__(self, headers):
        self.headers = headers


class Upstream(Quiet):
    """The model: every token checked by Authlib's Bearer token validator."""

    def do_GET(self):
        with STORE.lock:
            STORE.upstream_requests += 1
        header = self.headers.get("authorization", "")
        token = STORE.tokens.get(header[len("Bearer "):]) if header.startswith("Bearer ") else None
        try:
            PROTECTOR.validate_request([SCOPE], HeadersOnly({"Authorization": header}))
        except rfc6749.OAuth2Error as error:
            with STORE.lock:
                if token is not None and token.is_expired():
                    STORE.expired_seen += 1
                STORE.rejected.append(
                    "expired" if token is not None and token.is_expired()
                    else "revoked" if token is not None and token.revoked
                    else f"{error.error}: {header[:20]!r}"
                )
            self.reply(401, {"error": error.error}, [("www-authenticate", 'Bearer error="invalid_token"')])
            return
        with STORE.lock:
            STORE.accepted += 1
        self.reply(200, {"ok": True})


class Server:
    def __init__(self, handler, port=0):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------
# keyrelay
# ---------------------------------------------------------------------------


class Relay:
    def __init__(self, binary, token_url, upstream_port):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="keyrelay-authlib-", suffix=".log")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "AUTHLIB_TEST_SECRET": CLIENT_SECRET,
            # Every line at every level is scanned for the secret and tokens.
            "RUST_LOG": "trace",
        }
        self.process = subprocess.Popen(
            [
                binary,
                "--listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0",
                "--upstream", f"http://127.0.0.1:{upstream_port}",
                "--warm-connections", "0",
                "--oauth-token-url", token_url,
                "--oauth-client-id", CLIENT_ID,
                "--oauth-client-secret-env", "AUTHLIB_TEST_SECRET",
                "--oauth-scope", SCOPE,
                "--oauth-auth-method", "basic",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        line = wait_for("keyrelay ready", lambda: self.find(r"keyrelay ready.*"))
        self.port = int(re.search(r"listen=127\.0\.0\.1:(\d+)", line).group(1))
        self.admin = int(re.search(r"admin=127\.0\.0\.1:(\d+)", line).group(1))

    def text(self):
        self.log.flush()
        with open(self.log.name) as log:
            return log.read()

    def find(self, pattern):
        if self.process.poll() is not None:
            fail(f"keyrelay exited with {self.process.returncode}:\n{self.text()}")
        match = re.search(pattern, self.text())
        return match and match.group(0)

    def get(self, path="/v1/models", port=None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=STEP)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, response.getheader("retry-after"), body

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STEP)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        text = self.text()
        self.log.close()
        return text


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------


def main():
    binary = sys.argv[1]
    # run.sh's trap (or timeout) ends this with SIGTERM: still stop keyrelay.
    signal.signal(signal.SIGTERM, lambda *_: fail("terminated"))
    idp = Server(TokenEndpoint)
    upstream = Server(Upstream)
    token_url = f"http://127.0.0.1:{idp.port}/oauth/token"
    relay = None
    try:
        relay = Relay(binary, token_url, upstream.port)
        run_cases(relay, idp, token_url)
    finally:
        log = relay.stop() if relay else ""
        upstream.stop()
        for secret in [CLIENT_SECRET] + [t.value for t in STORE.issued]:
            if secret in log:
                fail("keyrelay's log printed the client secret or a token")
    if "TRACE" not in log:
        fail("keyrelay's log has no trace-level line to scan")
    ok("keyrelay's log, at trace level, holds neither the client secret nor any token")
    print("1 passed, 0 failed: tests/oauth_authlib", flush=True)


def run_cases(relay, idp, token_url):
    # 1. Fetched at startup, by Authlib's client credentials grant.
    if STORE.token_requests != 1 or STORE.issued_count() != 1:
        fail(f"expected one token request at startup, saw {STORE.token_requests}")
    status, _, body = relay.get()
    if status != 200:
        fail(f"first request: {status} {body!r}")
    ok("the token was fetched once at startup (client_secret_basic, scope) and accepted upstream")

    # 2. Cached, and refreshed before expiry, across several expiries.
    rounds, started = 0, time.monotonic()
    while time.monotonic() - started < 3.2 * EXPIRES_IN:
        status, _, body = relay.get()
        if status != 200:
            fail(f"request {rounds} during rotations: {status} {body!r}; upstream rejected {STORE.rejected}")
        rounds += 1
        time.sleep(0.03)
    with STORE.lock:
        issued = list(STORE.issued)
        rejected = list(STORE.rejected)
        expired_seen = STORE.expired_seen
    if expired_seen or rejected:
        fail(f"the upstream saw {expired_seen} expired tokens, rejected {rejected}")
    ok(f"{rounds} requests over {3.2 * EXPIRES_IN:.1f} s: zero expired tokens seen upstream")
    if not 3 <= len(issued) <= 7:
        fail(f"{len(issued)} tokens issued for {rounds} requests over ~3 lifetimes (expected 4 or 5)")
    ok(f"cached: {len(issued)} tokens issued for {rounds} requests")
    for before, after in zip(issued, issued[1:]):
        margin = before.expires_at() - after.issued_at
        if margin <= 0:
            fail(f"a token was replaced {-margin:.2f} s after it expired")
    ok("refreshed before expiry: each token was issued while the one before still lived")

    # 3. A token the server stops honouring early: the 401 passes through,
    #    and keyrelay fetches one new token for it.
    # Just after a scheduled refresh, so that none falls inside this step.
    count = STORE.issued_count()
    wait_for("the next scheduled refresh", lambda: STORE.issued_count() > count, bound=EXPIRES_IN + 1)
    time.sleep(0.2)  # the new token's answer reaches keyrelay
    with STORE.lock:
        STORE.issued[-1].revoked = True
        before = len(STORE.issued)
    status, _, _ = relay.get()
    if status != 401:
        fail(f"a revoked token's request answered {status}, expected the upstream's 401")
    wait_for("a token fetched after the 401", lambda: STORE.issued_count() > before, bound=2.0)
    status, _, body = relay.get()
    if status != 200:
        fail(f"after the 401's refresh: {status} {body!r}")
    if STORE.issued_count() != before + 1:
        fail(f"{STORE.issued_count() - before} tokens fetched for one 401")
    ok("an upstream 401 passed through and made keyrelay fetch exactly one new token")

    # 4. The authorization server stopped: the token in use is used until it
    #    expires, then 503 credential_unavailable and nothing forwarded.
    idp.stop()
    with STORE.lock:
        last = STORE.issued[-1]
    while time.time() < last.expires_at() - 0.3:
        status, _, body = relay.get()
        if status != 200:
            fail(f"before expiry, with the server down: {status} {body!r}")
        time.sleep(0.05)
    wait = last.expires_at() - time.time() + 0.1
    if wait > 0:
        time.sleep(wait)
    forwarded = STORE.upstream_requests
    for _ in range(3):
        status, retry_after, body = relay.get()
        answer = json.loads(body)
        if status != 503 or answer.get("type") != "credential_unavailable" or not retry_after:
            fail(f"after expiry with the server down: {status} {retry_after!r} {body!r}")
    if STORE.upstream_requests != forwarded:
        fail("a request was forwarded after the token expired")
    if STORE.expired_seen:
        fail(f"the upstream saw {STORE.expired_seen} expired tokens")
    status, _, body = relay.get("/readyz", port=relay.admin)
    if status != 503 or b"credential_unavailable" not in body:
        fail(f"/readyz with no valid token: {status} {body!r}")
    ok("server down: the live token served until expiry, then 503 credential_unavailable "
       "(Retry-After), nothing forwarded, /readyz 503")

    # 5. The server back on its port: keyrelay recovers on its own.
    port = int(token_url.split(":")[2].split("/")[0])
    idp_again = Server(TokenEndpoint, port)
    try:
        wait_for("keyrelay to fetch a token again", lambda: relay.get()[0] == 200, bound=35.0)
    finally:
        idp_again.stop()
    ok("the server back: keyrelay fetched a token and requests pass again")
    if STORE.expired_seen:
        fail(f"the upstream saw {STORE.expired_seen} expired tokens")


if __name__ == "__main__":
    main()
