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

It listens on the loopback unless `--ip` says otherwise (then it warns who can reach it), and it
takes no orders from other web pages: an API request, or any request that is not a GET, carrying
the Origin of a page other than the dashboard's own or an allowed proxy's is refused (`OriginCheck`).

A training run's side of it lives here too: finding the dashboard (`--dashboard auto`), pointing
labml's web-API writer at it, and claiming the run so its hyperparameter page takes changes.
"""

import argparse
import errno
import ipaddress
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Optional, Tuple

from errors import Parser
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


# ## Who may give the dashboard orders
#
# A browser lets any page it shows send a "simple" cross-origin request (a POST with a text/plain
# body, no preflight) to 127.0.0.1, and labml-app 0.0.102 takes such a POST to
# /api/v1/hyper_params/<run> as a change; it also grants https://app.labml.ai CORS with
# credentials, so a page there could read the API (the run list) and send any request. A browser
# names the page's origin in the Origin header of every cross-origin request and of every
# same-origin one but GET and HEAD; scripts (the training run's labml writer, urllib, curl) send
# none. So a request that carries an Origin is checked, and one from a page of another origin is
# refused: all under /api/, reads included, and every other method but GET and HEAD anywhere.
# Allowed are the dashboard's own origins, the origins `--allow-origin` names (a proxy that serves
# the dashboard at an origin of its own, such as Colab's port proxy), and, in Colab, Colab's.


def is_loopback(ip: str) -> bool:
    """`ip` (an address or a name) reaches only this machine: every address it stands for is a
    loopback one."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(ip, None, type=socket.SOCK_STREAM)}
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (socket.gaierror, UnicodeError, ValueError):
        return False


def is_wildcard(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified  # 0.0.0.0 or ::
    except ValueError:
        return False


def url_host(host: str) -> str:
    """A host as it stands in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host.lower()


def own_origins(ip: str, port: int) -> set:
    """The origins of the dashboard's own page, served from ip:port: http://<ip>:<port>, and
    127.0.0.1, localhost and [::1] at its port when it listens on the loopback or on every address."""
    hosts = {ip}
    if is_loopback(ip) or is_wildcard(ip):
        hosts |= {"127.0.0.1", "localhost", "::1"}
    return {f"http://{url_host(h)}" + ("" if port == 80 else f":{port}") for h in hosts}


ORIGIN_PATTERN_CHARS = "[a-z0-9-]+"  # what a * of --allow-origin stands for: never a dot, colon or slash


def as_origin(url: str) -> str:
    """An --allow-origin value as a browser writes an Origin: lowercase, no slash after the host
    (Colab's proxyPort gives its URL with one), no default port."""
    origin = url.strip().lower().rstrip("/")
    for scheme, port in (("http", ":80"), ("https", ":443")):
        if origin.startswith(f"{scheme}://") and origin.endswith(port):
            origin = origin[: -len(port)]
    return origin


def origin_problem(given: str) -> Optional[str]:
    """What is wrong with an --allow-origin value, or None: it must be scheme://host[:port], http or
    https, nothing after the host and port (but a slash); * stands for part of a name in the host."""
    from urllib.parse import urlsplit

    origin = as_origin(given)
    try:
        url = urlsplit(origin)
        url.port  # raises on a port that is not a number
    except ValueError:
        url = None
    if (
        url is None
        or url.scheme not in ("http", "https")
        or not url.hostname
        or url.path
        or url.query
        or url.fragment
        or "@" in url.netloc
        or not re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9*.-]+)(:[0-9]+)?", url.netloc)
    ):
        return f"{given!r} is not an origin such as https://proxy.example.com or http://127.0.0.1:8080"
    return None


def origin_matcher(origins) -> "re.Pattern":
    """One pattern that matches exactly the origins given, a * in one standing for part of a name."""
    alternatives = [re.escape(o).replace(r"\*", ORIGIN_PATTERN_CHARS) for o in origins]
    return re.compile("|".join(f"(?:{a})" for a in alternatives) or "(?!)")


def colab_proxy_origins(port: int) -> list:
    """The origins Colab's port proxy serves the kernel's `port` at, in the browser:
    https://<id>-<port>-colab.googleusercontent.com, and https://<port>-<runtime>.<region>.prod.colab.dev
    on newer runtimes. Only `port`: the same hosts with another port number (notebook output frames
    have 0) are other servers."""
    return [f"https://*-{port}-colab.googleusercontent.com", f"https://{port}-*.*.prod.colab.dev"]


def in_colab(environ=os.environ) -> bool:
    return "COLAB_RELEASE_TAG" in environ


def is_machine_name(host: str) -> bool:
    """`host` (from a Host header, port and all) names this machine as only it can be named: an
    address, localhost, or the machine's own name. Not any other name, which could be a page's
    own that resolves to this machine for the moment (DNS rebinding)."""
    from urllib.parse import urlsplit

    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}


class OriginCheck:
    """ASGI middleware: a request with an Origin header other than `allowed` is answered 403, and
    the app never sees it, if it is under /api/ or is not a GET or HEAD. `allowed` holds exact
    origins and ones with * (see `origin_matcher`). With `same_host` (for a dashboard that listens
    beyond the loopback, reached by whatever address or name of this machine) an Origin that is
    http://<the request's Host> is its own too, if that Host `is_machine_name`."""

    def __init__(self, app, allowed, same_host: bool = False):
        self.app = app
        self.allowed = origin_matcher(allowed)
        self.same_host = same_host
        self.told = set()

    def allows(self, scope) -> bool:
        headers = [(k, v.decode("latin-1").strip().lower()) for k, v in scope.get("headers", [])]
        origins = {v for k, v in headers if k == b"origin"}
        if not origins:
            return True  # not a page: a script, or a page's same-origin GET
        if len(origins) > 1:
            return False
        (origin,) = origins
        if self.allowed.fullmatch(origin):
            return True
        hosts = [v for k, v in headers if k == b"host"]
        return self.same_host and len(hosts) == 1 and origin == f"http://{hosts[0]}" and is_machine_name(hosts[0])

    async def __call__(self, scope, receive, send):
        guarded = scope["type"] == "http" and (
            scope["path"].startswith("/api/") or scope["method"] not in ("GET", "HEAD")
        )
        if not guarded or self.allows(scope):
            return await self.app(scope, receive, send)
        origin = dict(scope["headers"]).get(b"origin", b"").decode("latin-1")
        if origin not in self.told and len(self.told) < 20:  # once an origin: for whoever set up a proxy
            self.told.add(origin)
            print(
                f"dashboard: refused a request from a page at {origin!r}: only the dashboard's own page and "
                f"the origins --allow-origin names may use its API",
                file=sys.stderr,
                flush=True,
            )
        body = json.dumps({"error": "refused: this dashboard takes no requests from pages of another origin"})
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def create_app(ip: str = DEFAULT_IP, port: int = DEFAULT_PORT, allow_origins=()):
    """labml-app's ASGI app, behind a small router that serves the offline page and assets, behind
    the origin check: the dashboard's own origins and `allow_origins` may use its API."""
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

    own = own_origins(ip, port)
    return OriginCheck(app, [*own, *allow_origins], same_host=not is_loopback(ip))


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


def serve_in_background(
    port: int = DEFAULT_PORT, log: Path = Path("logs/dashboard.log"), timeout: float = 60, allow_origins=()
):
    """The dashboard's URL, serving from a process of its own (for a notebook), or None when it did
    not start in `timeout` seconds (`log` says why); one that answers on `port` already is used as
    it is. The server runs in a session of its own, so that interrupting a notebook's kernel leaves
    it be, and Linux stops it when the process that started it ends. `allow_origins` are passed on
    as --allow-origin (in Colab, Colab's port proxy is allowed without them)."""
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
        *[arg for origin in allow_origins for arg in ("--allow-origin", origin)],
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
    parser = Parser(
        prog="ppo_breakout.py dashboard",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve the labml dashboard (labml-app 0.0.102) offline, to watch and steer runs.",
    )
    parser.add_argument(
        "--ip",
        default=DEFAULT_IP,
        help="address to listen on; any other than the loopback lets everyone who can reach this machine "
        "see and change its runs",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="the origin of a proxy that serves this dashboard's page (such as https://proxy.example.com; "
        "a * stands for part of a name), whose pages may then use its API like its own; repeatable. "
        "In Colab its port proxy is allowed without it",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"{parser.prog}: error: argument --port: {args.port} is not a port number", file=sys.stderr)
        return 2
    for origin in args.allow_origin:
        problem = origin_problem(origin)
        if problem:
            print(f"{parser.prog}: error: argument --allow-origin: {problem}", file=sys.stderr)
            return 2
    args.allow_origin = [as_origin(origin) for origin in args.allow_origin]
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
    if not is_loopback(args.ip):
        print(
            f"{parser.prog}: warning: listening on {args.ip}: anyone who can reach this machine on port "
            f"{args.port} can see and change its runs",
            file=sys.stderr,
            flush=True,
        )
    allowed = [*args.allow_origin, *(colab_proxy_origins(args.port) if in_colab() else [])]
    app = create_app(args.ip, args.port, allowed)
    print(f"labml dashboard: http://{args.ip}:{args.port}  (data in ~/.labml/app/data; Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.ip, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
