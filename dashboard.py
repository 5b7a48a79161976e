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

A training run's side of it lives here too: finding the dashboard (`--dashboard auto`), pointing
labml's web-API writer at it, and claiming the run so its hyperparameter page takes changes.
"""

import argparse
import errno
import os
import re
import socket
import sys
from pathlib import Path
from typing import Optional, Tuple

from ppo_breakout import die_with_parent

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


# ## The training run's side: find the dashboard, report to it, claim the run


DASHBOARD_URL = f"http://{DEFAULT_IP}:{DEFAULT_PORT}"  # where `python ppo_breakout.py dashboard` listens


def dashboard_answers(url: str, timeout: float = 1.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/v1/auth/is_logged", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def dashboard_flag_problem(flag: str) -> Optional[str]:
    """What is wrong with the --dashboard flag, or None: a mistyped URL must not quietly turn
    the dashboard off."""
    from urllib.parse import urlparse

    if flag in ("auto", "off"):
        return None
    url = urlparse(flag)
    try:
        url.port  # raises on a port that is not a number in 0-65535
        valid = url.scheme in ("http", "https") and bool(url.hostname)
    except ValueError:
        valid = False
    return None if valid else f"must be auto, off or an http(s) URL such as {DASHBOARD_URL}, got {flag!r}"


def choose_dashboard(flag: str) -> Tuple[Optional[str], Optional[str]]:
    """(dashboard URL or None, one line to print or None) for the --dashboard flag."""
    if flag == "off":
        return None, None
    if flag == "auto":
        from labml.internal.lab import lab_singleton

        configured = lab_singleton().web_api  # .labml.yaml's web_api, or the labml_server variable
        url = configured.url.split("/api/v1/")[0] if configured is not None else DASHBOARD_URL
    else:
        url = flag.rstrip("/")
    if dashboard_answers(url):
        return url, None
    return None, f"no labml dashboard answers at {url}: metrics go to the run folder only"


def connect_dashboard(url: str):
    """Point labml's web-API writer at the dashboard: it sends the metrics and brings back the
    hyperparameter changes made there (in the answer to each send, about 3 s later)."""
    from labml import lab

    lab.configure(
        {
            "web_api": f"{url}/api/v1/track?",
            "web_api_frequency": 0,  # send at every tracker.save
            "web_api_verify_connection": False,
            "web_api_open_browser": False,
        }
    )


def connect(flag: str) -> Optional[str]:
    """The dashboard the --dashboard flag names, with labml's writer pointed at it, or None."""
    url, notice = choose_dashboard(flag)
    if notice:
        print(notice)
    if url:
        connect_dashboard(url)
    return url


def claim_run(url: str, run_uuid: str, timeout: float = 600.0):
    """Claim the run on the dashboard (its page ignores hyperparameter changes until then). The run
    appears there with labml's first send, so retry until it does. labml-app answers every claim of
    an existing run with success, even one it then undoes or ignores (see `create_app`), so read the
    run back and stop only when it says claimed; otherwise say so. Runs in a daemon thread."""
    print(f"dashboard: {url}/run/{run_uuid}\nhyperparameters: {url}/run/{run_uuid}/hyper_params")
    import json
    import threading
    import time
    import urllib.request

    from labml import logger

    def claimed() -> bool:
        claim = urllib.request.Request(f"{url}/api/v1/run/{run_uuid}/claim", method="PUT")
        urllib.request.urlopen(claim, timeout=10).close()
        with urllib.request.urlopen(f"{url}/api/v1/run/{run_uuid}", timeout=10) as response:
            return bool(json.loads(response.read()).get("is_claimed"))

    def claim():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if claimed():
                    return
            except (OSError, ValueError):
                pass  # not there yet, or the dashboard is busy
            time.sleep(1.0)
        logger.log(f"could not claim run {run_uuid} on {url}: claim it on its page to change hyperparameters")

    threading.Thread(target=claim, name="claim-run", daemon=True).start()


def serve_in_background(port: int = DEFAULT_PORT, log: Path = Path("logs/dashboard.log"), timeout: float = 60):
    """The dashboard's URL, serving from a process of its own (for a notebook), or None when it did
    not start in `timeout` seconds (`log` says why); one that answers on `port` already is used as
    it is. The server runs in a session of its own, so that interrupting a notebook's kernel leaves
    it be, and Linux stops it when the process that started it ends."""
    import functools
    import signal
    import subprocess
    import time

    url = f"http://{DEFAULT_IP}:{port}"
    if dashboard_answers(url):
        return url

    log.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve().parent / "ppo_breakout.py"),
        "dashboard",
        "--port",
        str(port),
    ]
    with open(log, "a") as out:
        server = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
        )
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        if dashboard_answers(url):
            return url
        time.sleep(0.5)
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
