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


def start_dashboard(home: Path, port: int) -> subprocess.Popen:
    # output to a file: the server logs every request, and a full pipe would stall it
    log = home / f"dashboard-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ppo_breakout.py"), "dashboard", "--port", str(port)],
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
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    server = {"url": f"http://127.0.0.1:{port}", "home": home, "port": port, "process": start_dashboard(home, port)}
    yield server
    stop(server["process"])  # the one running now: the restart test replaces it


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


def test_a_real_browser_changes_a_value_with_the_page_controls_and_the_trainer_uses_it(dashboard, training):
    """Through a reverse proxy on another port, which serves the page from another origin at its
    root path, as Colab's port proxy does for the notebook's dashboard."""
    from reverse_proxy import ReverseProxy
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

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
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    proxy = ReverseProxy(dashboard["url"]).__enter__()
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
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
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
        proxy.__exit__(None, None, None)


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
    dashboard["process"] = start_dashboard(dashboard["home"], dashboard["port"])
    run = get_json(f"{dashboard['url']}/api/v1/run/{training.uuid}")
    assert run["run_uuid"] == training.uuid and run["name"] == "ppo_breakout"
    assert run["is_claimed"]
