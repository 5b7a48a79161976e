"""The labml dashboard, for real: labml-app 0.0.102 served by `ppo_breakout.py dashboard`, a real
training run reporting to it, HTTP changes and a headless Chromium using the page's own controls."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import (
    KEPT_RUNNING,
    ROOT,
    TINY,
    answers,
    copy_script,
    dashboard_answers,
    flags,
    free_port,
    run_main,
    wait_for,
)
from reverse_proxy import PageServer, ReverseProxy

import cli

ARTIFACTS = ROOT / "test-artifacts"
# one minibatch an update: quick updates, so a change shows soon, whatever epochs the dashboard sets
TRAIN = ["--updates", "100000", *flags(dict(TINY, batches=1))]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post_json(url: str, data: dict):
    request = urllib.request.Request(
        url, data=json.dumps(data).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_dashboard(home: Path, port: int, *args: str) -> subprocess.Popen:
    # output to a file: the server logs every request, and a full pipe would stall it
    log = home / f"dashboard-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ppo_breakout.py"), "dashboard", "--port", str(port), *args],
        cwd=home,
        env={**os.environ, "HOME": str(home)},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: dashboard_answers(url) or process.poll() is not None, 60, "the dashboard", every=0.1)
    assert process.poll() is None, log.read_text()[-3000:]
    KEPT_RUNNING.add(process.pid)  # the module's server, from test to test
    return process


def stop(process: subprocess.Popen):
    KEPT_RUNNING.discard(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """The module's dashboard, with a reverse proxy in front of it that stands in for Colab's port
    proxy: its origin is allowed as Colab's are (`--allow-origin`)."""
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proxy = ReverseProxy(url)  # listening already, so its origin is known before the dashboard starts
    args = ("--allow-origin", proxy.url)
    server = {"url": url, "home": home, "port": port, "args": args, "proxy": proxy.__enter__()}
    try:
        server["process"] = start_dashboard(home, port, *args)
        yield server
        stop(server["process"])  # the one running now: the restart test replaces it
    finally:
        proxy.__exit__(None, None, None)


class Training:
    """A training subprocess reporting to the dashboard; `metrics()` reads its metrics.jsonl."""

    def __init__(self, folder: Path, home: Path, url: str):
        copy_script(folder)
        self.folder = folder
        self.log = folder / "train.log"  # a file, not a pipe nobody reads, which would stall the trainer
        self.process = subprocess.Popen(
            [sys.executable, "ppo_breakout.py", "--dashboard", url, *TRAIN],
            cwd=folder,
            env={**os.environ, "HOME": str(home)},
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )
        try:
            self.run = wait_for(lambda: self._run_folder(), 120, "the run's first update")
        except BaseException:
            stop(self.process)  # a trainer left running would slow every later test
            raise
        self.uuid = self.run.name

    def _run_folder(self):
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        found = [p.parent for p in self.folder.glob("logs/ppo_breakout/*/metrics.jsonl")]
        return found[0] if found else None

    def metrics(self):
        return [json.loads(line) for line in (self.run / "metrics.jsonl").read_text().splitlines()]

    def wait_for_update_using(self, timeout: float = 90, **values):
        def used():
            assert self.process.poll() is None, "the run stopped"
            for record in self.metrics():
                if all(record[k] == pytest.approx(v) for k, v in values.items()):
                    return record
            return None

        return wait_for(used, timeout, f"an update using {values}", every=0.1)

    def stop(self) -> str:
        """Stop it as `kill` does (SIGTERM: it ends its update with a checkpoint); its output."""
        stop(self.process)
        return self.log.read_text()


@pytest.fixture(scope="module")
def training(dashboard, tmp_path_factory):
    """One training run reporting to the dashboard, shared by the tests that steer it."""
    run = Training(tmp_path_factory.mktemp("training"), dashboard["home"], dashboard["url"])
    try:
        # the trainer claims its run, so the page can change it at once
        claimed = f"{dashboard['url']}/api/v1/run/{run.uuid}"
        wait_for(lambda: get_json(claimed).get("is_claimed"), 120, "the claim", every=0.1)
        # the dashboard takes changes once it has seen the hyperparameters (labml's first sends)
        hyper_params = f"{dashboard['url']}/api/v1/hyper_params/{run.uuid}"
        wait_for(lambda: len(get_json(hyper_params)["series"]) == 5, 60, "the hyperparameters", every=0.1)
        yield run
    finally:
        run.stop()


def chromium():
    """A headless Chromium that logs its network events; it reaches 127.0.0.1 only."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,1000",
        # every address but 127.0.0.1 goes to a proxy that is not there, so it fails
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
    ]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def network_events(driver) -> list:
    """The Chrome DevTools network events the browser logged since this was last called."""
    return [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]


def test_a_real_browser_changes_a_value_with_the_page_controls_and_the_trainer_uses_it(dashboard, training):
    """Through a reverse proxy on another port, which serves the page from another origin at its
    root path, as Colab's port proxy does for the notebook's dashboard."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium()
    proxy = dashboard["proxy"]
    try:
        driver.get(f"{proxy.url}/run/{training.uuid}/hyper_params")
        item = wait_for(
            lambda: [
                i
                for i in driver.find_elements(By.CSS_SELECTOR, ".sparkline-list-item")
                if i.find_element(By.CSS_SELECTOR, ".title").text == "clip_range"
            ],
            60,
            "the clip_range control",
        )[0]
        text_box = item.find_element(By.CSS_SELECTOR, "input:not([type=range])")
        assert text_box.get_attribute("value") == "0.100"  # the run's own value
        text_box.clear()
        text_box.send_keys("0.3", Keys.TAB)
        (save,) = [n for n in driver.find_elements(By.CSS_SELECTOR, "nav") if n.text.strip() == "save"]
        save.click()
        saved_at = time.time()
        record = training.wait_for_update_using(clip_range=0.3)
        print(f"page save to use: {record['time'] - saved_at:.1f} s")
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "hyper_params.png"))
        failed, requested = [], []
        for message in network_events(driver):
            if message["method"] == "Network.requestWillBeSent":
                requested.append(message["params"]["request"]["url"])
            if message["method"] == "Network.loadingFailed":
                failed.append(message["params"])
            elif message["method"] == "Network.responseReceived" and message["params"]["response"]["status"] >= 400:
                failed.append(message["params"]["response"]["url"])
        assert not failed, failed
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # the page and the change went through the proxy: nothing reached the server around it
        assert ("POST", f"/api/v1/hyper_params/{training.uuid}") in proxy.requests, proxy.requests
        assert not [u for u in requested if u.startswith(dashboard["url"])], requested
    finally:
        driver.quit()


def test_changes_through_the_http_endpoint_are_used_by_a_later_update(dashboard, training):
    # epochs in its range, clip_range out of it: clamped to the range, and the run goes on
    url = f"{dashboard['url']}/api/v1/hyper_params/{training.uuid}"
    assert post_json(url, {"clip_range": 5.0, "epochs": 2}) == {"errors": []}
    changed_at = time.time()
    record = training.wait_for_update_using(clip_range=0.5, epochs=2)
    print(f"change to use: {record['time'] - changed_at:.1f} s")
    assert "clip_range: 5.0 is outside 0.01..0.5, using 0.5" in training.log.read_text()
    # the dashboard's own series has the range
    series = {s["name"]: s for s in get_json(url)["series"]}
    assert series["clip_range"]["range"] == [0.01, 0.5]


def changes_js(url: str, change: dict) -> str:
    """JavaScript that POSTs `change` to `url` as a "simple" request (text/plain: no CORS preflight,
    so any page may send it) with the body the hyperparameter page sends, and puts the outcome in
    document.title: "answered STATUS", or "failed" where the browser hides the answer from the page."""
    return f"""fetch({json.dumps(url)}, {{method: "POST", headers: {{"Content-Type": "text/plain"}},
                                     body: {json.dumps(json.dumps(change))}}})
        .then(r => {{ document.title = "answered " + r.status; }}, e => {{ document.title = "failed"; }});"""


def status_of(events: list, method: str, url: str) -> list:
    """The HTTP statuses the browser received for `method url` (even those CORS keeps from the page)."""
    sent = {
        e["params"]["requestId"]
        for e in events
        if e["method"] == "Network.requestWillBeSent"
        and e["params"]["request"]["url"] == url
        and e["params"]["request"]["method"] == method
    }
    return [
        e["params"]["statusCode"]
        for e in events
        if e["method"] == "Network.responseReceivedExtraInfo" and e["params"]["requestId"] in sent
    ]


def changes_on_the_dashboard(dashboard, run_uuid: str, name: str) -> list:
    """The values the dashboard has taken for hyperparameter `name` of the run (its input series)."""
    series = {s["name"]: s for s in get_json(f"{dashboard['url']}/api/v1/hyper_params/{run_uuid}")["series"]}
    return series[name].get("sub", {}).get("value", [])


def test_a_page_from_another_origin_cannot_change_a_run_and_the_dashboards_own_page_can(dashboard, training):
    """A web page on another port, open in the user's browser, sends the change the hyperparameter
    page sends, as a text/plain POST (no preflight): refused with 403, the dashboard keeps its value
    and the trainer goes on with it. The same request from the dashboard's own page is taken."""
    hyper_params = f"{dashboard['url']}/api/v1/hyper_params/{training.uuid}"
    old = training.metrics()[-1]["value_loss_coef"]
    foreign, own = 0.9, 0.7
    assert old not in (foreign, own)
    change = changes_js(hyper_params, {"value_loss_coef": foreign})
    page = f"<!doctype html><title>waiting</title><script>{change}</script>"
    driver = chromium()
    try:
        with PageServer(page) as other_site:
            sent_at = time.time()
            driver.get(other_site.url)
            wait_for(lambda: driver.title != "waiting", 30, "the other page's request")
        assert driver.title == "failed"  # the page may not read the answer either way
        assert status_of(network_events(driver), "POST", hyper_params) == [403]
        assert foreign not in changes_on_the_dashboard(dashboard, training.uuid, "value_loss_coef")
        # the run goes on with its value for longer than a change takes to arrive (about 3 to 6 s)
        wait_for(lambda: training.metrics()[-1]["time"] > sent_at + 15, 90, "15 s of updates")
        later = [r["value_loss_coef"] for r in training.metrics() if r["time"] > sent_at]
        assert later and all(v == pytest.approx(old) for v in later), later

        # the dashboard's own page, same request: its origin is the dashboard's
        driver.get(f"{dashboard['url']}/api/v1/auth/is_logged")
        driver.execute_script(changes_js(hyper_params, {"value_loss_coef": own}))
        wait_for(lambda: driver.title.startswith(("answered", "failed")), 30, "the own page's request")
        assert driver.title == "answered 200"
        assert own in changes_on_the_dashboard(dashboard, training.uuid, "value_loss_coef")
        training.wait_for_update_using(value_loss_coef=own)
    finally:
        driver.quit()
    assert foreign not in [r["value_loss_coef"] for r in training.metrics()]


@pytest.mark.parametrize("method,path", [("GET", "/api/v1/runs/null"), ("OPTIONS", "/api/v1/hyper_params/x")])
def test_another_origin_may_not_read_the_api_even_one_labml_app_grants(dashboard, method, path):
    """labml-app 0.0.102 grants https://app.labml.ai CORS with credentials: a page there could
    read the run list and send preflighted changes. Every API request from another origin is
    refused, reads and preflights included; the same request with no Origin (a script) is answered."""
    headers = {"Origin": "https://app.labml.ai", "Access-Control-Request-Method": "POST"}
    request = urllib.request.Request(dashboard["url"] + path, method=method, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert "access-control-allow-origin" not in {k.lower() for k in refused.value.headers.keys()}
    assert "refused" in json.loads(refused.value.read())["error"]
    if method == "GET":
        assert "runs" in get_json(dashboard["url"] + path)


COLAB_PROXY = "https://abcdefghij-496ff2e9c6d22116-5005-colab.googleusercontent.com"
COLAB_DEV_PROXY = "https://5005-gpu-t4-s-2u4js8n7fvax5-a.us-west4-1.prod.colab.dev"


@pytest.mark.parametrize(
    "ip,method,path,origin,host,allowed",
    [
        ("127.0.0.1", "POST", "/api/v1/hyper_params/r", None, "127.0.0.1:5005", True),  # training, scripts
        ("127.0.0.1", "POST", "/api/v1/hyper_params/r", "http://127.0.0.1:5005", "127.0.0.1:5005", True),
        ("127.0.0.1", "POST", "/api/v1/hyper_params/r", "http://localhost:5005", "localhost:5005", True),
        ("127.0.0.1", "POST", "/api/v1/hyper_params/r", "http://[::1]:5005", "[::1]:5005", True),
        ("127.0.0.1", "POST", "/api/v1/hyper_params/r", COLAB_PROXY, "127.0.0.1:5005", True),
        ("127.0.0.1", "POST", "/api/v1/hyper_params/r", COLAB_DEV_PROXY, "127.0.0.1:5005", True),
        ("127.0.0.1", "GET", "/", "https://evil.example", "127.0.0.1:5005", True),  # the page is no secret
        ("127.0.0.1", "POST", "/api/v1/hyper_params/r", "http://127.0.0.1:8000", "127.0.0.1:5005", False),
        ("127.0.0.1", "GET", "/api/v1/runs/null", "https://app.labml.ai", "127.0.0.1:5005", False),
        ("127.0.0.1", "PUT", "/anything", "null", "127.0.0.1:5005", False),  # a sandboxed frame, a file
        # a notebook's output frame (port 0) and others' ports on Colab's hosts, look-alike hosts
        ("127.0.0.1", "POST", "/api/v1/run/r", COLAB_PROXY.replace("-5005-", "-0-"), "127.0.0.1:5005", False),
        ("127.0.0.1", "POST", "/api/v1/run/r", COLAB_DEV_PROXY.replace("5005-", "15005-"), "127.0.0.1:5005", False),
        ("127.0.0.1", "POST", "/api/v1/run/r", COLAB_PROXY + ".evil.example", "127.0.0.1:5005", False),
        # DNS rebinding: a page at a name that now resolves to 127.0.0.1
        ("127.0.0.1", "POST", "/api/v1/run/r", "http://rebind.example:5005", "rebind.example:5005", False),
        # listening on every address, reached by one of this machine's addresses, or by another name
        ("0.0.0.0", "POST", "/api/v1/run/r", "http://192.0.2.7:5005", "192.0.2.7:5005", True),
        ("0.0.0.0", "POST", "/api/v1/run/r", "http://192.0.2.7:5005", "192.0.2.8:5005", False),
        ("0.0.0.0", "POST", "/api/v1/run/r", "http://rebind.example:5005", "rebind.example:5005", False),
    ],
)
def test_who_may_use_the_api(ip, method, path, origin, host, allowed):
    """The rule of `dashboard.OriginCheck`, for a dashboard on ip:5005 (in Colab, with its proxy's
    origins allowed, as `ppo_breakout.py dashboard` adds them there)."""
    import asyncio

    import dashboard

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def send(message):
        sent.append(message)

    check = dashboard.OriginCheck(
        app,
        [*dashboard.own_origins(ip, 5005), *dashboard.colab_proxy_origins(5005)],
        same_host=not dashboard.is_loopback(ip),
    )
    headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin else [])
    asyncio.run(check({"type": "http", "method": method, "path": path, "headers": headers}, None, send))
    assert bool(reached) == allowed
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == ([] if allowed else [403])


def test_a_claim_that_lands_while_a_track_request_waits_for_its_body_stays(dashboard):
    """labml-app's track handler loads the run, waits for the request body, then saves what it
    loaded: a claim in that wait was lost for good. Here the body is sent in two parts with the
    claim in between, the order that left runs unclaimed in a loaded CI run."""
    run_uuid = uuid.uuid4().hex
    run = f"{dashboard['url']}/api/v1/run/{run_uuid}"
    track = f"/api/v1/track?run_uuid={run_uuid}&labml_version=0.4.168"
    # labml-app answers a track request 3 s after it has saved it: the run exists before then
    first = {}
    thread = threading.Thread(
        target=lambda: first.update(post_json(dashboard["url"] + track, {"name": "claim race", "time": time.time()})),
        daemon=True,
    )
    thread.start()
    wait_for(lambda: answers(run), 30, "the new run", every=0.1)
    body = json.dumps({"time": time.time()}).encode()
    head = (
        f"POST {track} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", dashboard["port"]), timeout=30) as connection:
        connection.sendall(head + body[:1])
        # the handler has started and waits for the rest of the body: a moment, no event shows it
        time.sleep(1.0)
        claim = urllib.request.Request(f"{run}/claim", method="PUT")
        urllib.request.urlopen(claim, timeout=10).close()
        assert get_json(run)["is_claimed"]
        connection.sendall(body[1:])
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
    assert get_json(run)["is_claimed"]
    thread.join(30)
    assert first["errors"] == []


def test_the_page_refers_to_no_other_machine(dashboard):
    with urllib.request.urlopen(f"{dashboard['url']}/run/x/hyper_params", timeout=10) as response:
        page = response.read().decode()
    assert "http" not in page.split("<body")[0].replace('content="', "")
    for asset in (
        "/vendor/d3/d3.min.js",
        "/vendor/bootstrap/bootstrap.min.css",
        "/vendor/fontawesome/css/all.min.css",
        "/vendor/fontawesome/webfonts/fa-solid-900.woff2",
    ):
        with urllib.request.urlopen(dashboard["url"] + asset, timeout=10) as response:
            assert response.status == 200 and len(response.read()) > 1000, asset


def test_without_a_dashboard_training_says_so_in_one_line_and_goes_on(short_cli_run):
    # the shared short run was told to report to a dashboard URL where nothing answers
    url, result, run = short_cli_run.dashboard, short_cli_run.result, short_cli_run.run
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    assert output.count("dashboard") == 1  # the one notice
    assert f"no labml dashboard answers at {url}: metrics go to the run folder only\n" in output
    assert "Retrying" not in output and "Failed to connect" not in output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "ip,problem",
    [("999.1.1.1", "999.1.1.1 is not an address"), ("192.0.2.1", "cannot listen on 192.0.2.1:5005")],
)
def test_the_dashboard_refuses_an_address_it_cannot_listen_on(capsys, ip, problem):
    # `python ppo_breakout.py dashboard --ip IP`, its main() called here (the server above is
    # started by the real command line)
    assert run_main(cli.main, "dashboard", "--ip", ip) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppo_breakout.py dashboard: error: argument --ip: "), lines
    assert problem in lines[0], lines


@pytest.mark.parametrize("ip", ["0.0.0.0", None])
def test_listening_beyond_the_loopback_says_who_can_steer_its_runs_and_serves(tmp_path, ip):
    """`python ppo_breakout.py dashboard --ip 0.0.0.0` prints one warning line on stderr and serves;
    the default, the loopback, prints none."""
    port = free_port()
    command = [sys.executable, str(ROOT / "ppo_breakout.py"), "dashboard", "--port", str(port)]
    command += ["--ip", ip] if ip else []
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},
        stdout=open(tmp_path / "stdout", "w"),
        stderr=open(tmp_path / "stderr", "w"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: dashboard_answers(url) or process.poll() is not None, 60, "the dashboard", every=0.1)
        assert process.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
    finally:
        stop(process)
    ours = [line for line in (tmp_path / "stderr").read_text().splitlines() if line.startswith("ppo_breakout.py")]
    warning = (
        f"ppo_breakout.py dashboard: warning: listening on 0.0.0.0: anyone who can reach this machine on "
        f"port {port} can see and change its runs"
    )
    assert ours == ([warning] if ip else []), ours


def test_in_colab_the_dashboard_takes_changes_from_colabs_proxy_of_its_port(tmp_path):
    """Colab (COLAB_RELEASE_TAG set) serves the kernel's port to the browser at an https origin
    of its own; the notebook starts the dashboard as `serve_in_background` does, with no flag."""
    port = free_port()
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "ppo_breakout.py"), "dashboard", "--port", str(port)],
            cwd=tmp_path,
            env={**os.environ, "HOME": str(tmp_path), "COLAB_RELEASE_TAG": "release-colab_20260101-060000_RC00"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: dashboard_answers(url) or process.poll() is not None, 60, "the dashboard", every=0.1)
        assert process.poll() is None, (tmp_path / "log").read_text()[-3000:]

        def status(origin: str) -> int:
            request = urllib.request.Request(f"{url}/api/v1/runs/null", headers={"Origin": origin})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert status(COLAB_PROXY.replace("5005", str(port))) == 200
        assert status(COLAB_DEV_PROXY.replace("5005", str(port))) == 200
        assert status(COLAB_PROXY.replace("-5005-", "-0-")) == 403  # a notebook's output frame
        assert status(f"http://127.0.0.1:{free_port()}") == 403  # any other page
    finally:
        stop(process)


def test_the_dashboard_refuses_a_port_in_use(dashboard, capsys):
    assert run_main(cli.main, "dashboard", "--port", str(dashboard["port"])) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ppo_breakout.py dashboard: error: argument --port: 127.0.0.1:{dashboard['port']} is already in use"
    ]


def test_a_run_reporting_to_the_dashboard_stops_cleanly(training):
    # `kill`: it ends its update with a checkpoint; labml's last sends to the dashboard go through
    output = training.stop()
    assert training.process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output and "Retrying" not in output, output[-3000:]
    last_update = len(training.metrics())
    assert (training.run / "checkpoints" / f"update_{last_update:07d}.pt").exists()


def test_a_restarted_dashboard_keeps_the_run(dashboard, training):
    training.stop()  # its run is on the dashboard; a run reporting through a restart would retry in 10 s
    stop(dashboard["process"])
    dashboard["process"] = start_dashboard(dashboard["home"], dashboard["port"], *dashboard["args"])
    run = get_json(f"{dashboard['url']}/api/v1/run/{training.uuid}")
    assert run["run_uuid"] == training.uuid and run["name"] == "ppo_breakout"
    assert run["is_claimed"]
