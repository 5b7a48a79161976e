"""
The labml dashboard for ppo_breakout, self-hosted and offline.

    pip install -r requirements-dashboard.txt
    python ppo_breakout.py dashboard            # http://127.0.0.1:5005
    python ppo_breakout.py                      # trains, sending to the dashboard when it answers

It serves labml-app 0.0.102, the last release with a file database (kept in ~/.labml/app/data, so
runs survive a restart) and the hyperparameter screen, which the current labml-app lost. That
release's page loads d3, Bootstrap, Font Awesome, Sentry and mixpanel from CDNs, so offline it is
blank: here the page is rewritten on the fly to load d3 6.7.0, Bootstrap 5.0.0-beta2 and Font
Awesome 5.9.0 from `dashboard_assets/` (taken from the npm registry, with their licences), and
Sentry and mixpanel are replaced by inert stand-ins. Nothing inside site-packages is edited and the
page makes no request outside this machine.
"""

import argparse
import errno
import os
import re
import socket
import sys
from pathlib import Path
from typing import Optional, Tuple

ASSETS = Path(__file__).resolve().parent / "dashboard_assets"
DEFAULT_IP = "127.0.0.1"
DEFAULT_PORT = 5005

# Sentry and mixpanel, minus the network: the page's code calls these and must find them.
INERT_SCRIPTS = """<script>
window.Sentry = {init: function () {}, setExtra: function () {}, captureException: function () {},
                 Integrations: {BrowserTracing: function () {}}};
window.mixpanel = new Proxy({}, {get: function (target, name) {
    return name === 'people' ? window.mixpanel : function () {};
}});
</script>"""

# what each CDN reference of labml-app 0.0.102's index.html becomes
LOCAL_HEAD = [
    '<link href="/vendor/bootstrap/bootstrap.min.css" rel="stylesheet">',
    '<script src="/vendor/d3/d3.min.js"></script>',
    INERT_SCRIPTS,
    '<script src="/js/bundle.min.js"></script>',
    '<link href="/vendor/fontawesome/css/all.min.css" rel="stylesheet">',
    '<link href="/css/style.css" rel="stylesheet">',
]


def offline_index(html: str) -> str:
    """labml-app's index.html with every CDN reference replaced by its local copy or stand-in."""
    # drop every <script> and <link rel=stylesheet> in <head>, then put back the local ones
    head_end = html.index("</head>")
    head, rest = html[:head_end], html[head_end:]
    head = re.sub(r"<script\b.*?</script>\s*", "", head, flags=re.S)
    head = re.sub(r'<link\b[^>]*rel="stylesheet"[^>]*>\s*', "", head, flags=re.S)
    head = re.sub(r"<!--.*?-->\s*", "", head, flags=re.S)
    head = head.rstrip() + "\n    " + "\n    ".join(LOCAL_HEAD) + "\n"
    page = head + rest
    remote = re.findall(r'(?:src|href)="((?:https?:)?//[^"]+)"', page)
    if remote:
        raise RuntimeError(f"the dashboard page still refers to other machines: {remote}")
    return page


def create_app(ip: str = DEFAULT_IP, port: int = DEFAULT_PORT):
    """labml-app's ASGI app, behind a small router that serves the offline page and assets."""
    # labml-app's settings read these at import
    os.environ["LABML_APP_SERVER_IP"] = ip
    os.environ["LABML_APP_SERVER_PORT"] = str(port)
    from labml_app import handlers

    update_run = handlers._update_run

    async def _update_run(request, *args):
        # labml-app loads the run, then awaits the request body, then saves the run it loaded: a
        # claim that lands during that wait was saved over, unclaimed, and later claims are no-ops
        # (the run is already in the user's project). Read the body first, so load-to-save never waits.
        await request.json()
        return await update_run(request, *args)

    handlers._update_run = _update_run
    from labml_app import flask_app
    from starlette.responses import HTMLResponse
    from starlette.staticfiles import StaticFiles

    static = Path(flask_app.STATIC_PATH)
    index = HTMLResponse(offline_index((static / "index.html").read_text()))
    vendor = StaticFiles(directory=ASSETS)

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            if path.startswith("/vendor/"):
                scope = {**scope, "path": path[len("/vendor") :], "root_path": "/vendor"}
                return await vendor(scope, receive, send)
            # the single-page app's routes (/, /run/<uuid>/hyper_params, ...) all get the page
            if not path.startswith("/api/") and not (static / path.lstrip("/")).is_file():
                return await index(scope, receive, send)
        return await flask_app.app(scope, receive, send)

    return app


def listen_problem(ip: str, port: int) -> Optional[Tuple[str, str]]:
    """Why the dashboard cannot listen on ip:port, as (flag, problem), or None when it can."""
    try:
        family = socket.getaddrinfo(ip, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError):
        return "--ip", f"{ip} is not an address this machine can listen on"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "--port", f"{ip}:{port} is already in use"
            return "--ip", f"cannot listen on {ip}:{port}: {e.strerror}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ppo_breakout.py dashboard",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve the labml dashboard (labml-app 0.0.102) offline, to watch and steer runs.",
    )
    parser.add_argument("--ip", default=DEFAULT_IP, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"{parser.prog}: error: argument --port: {args.port} is not a port number", file=sys.stderr)
        return 2
    try:
        import labml_app  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(
            f"{parser.prog}: error: {e.name} is not installed: pip install -r requirements-dashboard.txt",
            file=sys.stderr,
        )
        return 2
    problem = listen_problem(args.ip, args.port)
    if problem:
        print(f"{parser.prog}: error: argument {problem[0]}: {problem[1]}", file=sys.stderr)
        return 2
    app = create_app(args.ip, args.port)
    print(f"labml dashboard: http://{args.ip}:{args.port}  (data in ~/.labml/app/data; Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.ip, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
