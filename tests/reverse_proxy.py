"""Small servers on ports of their own, for the dashboard's tests: a reverse proxy in front of a
server, as Colab's port proxy serves a kernel's port (every request, at the proxy's root path, goes
on to the server and its answer comes back), and a page from another origin."""

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# hop-by-hop headers (RFC 9110, 7.6.1) stay with the connection they came on
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


class BackgroundServer:
    """A threading HTTP server of `handler` on a free loopback port, at `url`, serving inside `with`."""

    def __init__(self, handler, path: str = ""):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class PageServer(BackgroundServer):
    """`with PageServer(html) as page:` serves `html` at `page.url`: a web page from another
    origin, such as any site the user has open."""

    def __init__(self, html: str):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(Handler, "/")


class ReverseProxy(BackgroundServer):
    """`with ReverseProxy("http://127.0.0.1:5005") as proxy:` serves it at `proxy.url`; `requests`
    lists the (method, path) of every request that came through."""

    def __init__(self, target: str):
        target = urlsplit(target)
        self.requests = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    content = response.read()
                finally:
                    connection.close()
                proxy.requests.append((self.command, self.path))
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = forward

            def log_message(self, *args):
                pass

        super().__init__(Handler)
