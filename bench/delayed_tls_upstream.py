#!/usr/bin/env python3
# A TLS HTTP/1.1 server (port argv[1]) behind a relay (port argv[2]) that
# delays each new connection by argv[3] ms before connecting it through:
# an upstream whose connection setup costs that much.
import asyncio, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import threading
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok"
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
tls_port, relay_port, delay = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000
srv = ThreadingHTTPServer(("127.0.0.1", tls_port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain("cert.pem", "key.pem")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data); await w.drain()
    finally:
        w.close()
async def handle(cr, cw):
    await asyncio.sleep(delay)
    ur, uw = await asyncio.open_connection("127.0.0.1", tls_port)
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw), return_exceptions=True)
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", relay_port)
    async with s: await s.serve_forever()
asyncio.run(main())
