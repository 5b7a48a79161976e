"""The Colab notebook, run headless in a real kernel: papermill for "Run all", jupyter_client for
an interrupt, and the Colab-only branches with google.colab replaced by a recorder."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill
import pytest
from conftest import ROOT, TINY, dashboard_answers, descendants, free_port, metrics_files, wait_for

from evaluate import SHIPPED_AGENT, SHIPPED_CURVE

NOTEBOOK = ROOT / "ppo_breakout.ipynb"
# the notebook's parameters for a run of the tiny configuration, and one evaluation game
PARAMETERS = dict(TINY, updates=2, eval_games=1)


def project_copy(folder: Path) -> Path:
    """The files the notebook needs beside it, as in a clone."""
    for path in ROOT.iterdir():
        if path.suffix in (".py", ".txt", ".ipynb") or path.name == ".labml.yaml":
            shutil.copy(path, folder / path.name)
    shutil.copytree(ROOT / "dashboard_assets", folder / "dashboard_assets")
    for shipped in (SHIPPED_AGENT, SHIPPED_CURVE):
        (folder / shipped).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / shipped, folder / shipped)
    return folder


def cell_sources(nb) -> dict:
    """The notebook's code cells by the heading of the markdown cell before them."""
    cells, heading = {}, None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            heading = cell.source.splitlines()[0].lstrip("# ")
        else:
            cells[heading] = cell.source
    return cells


def test_the_notebook_is_saved_without_outputs_and_has_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    (parameters,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    names = re.findall(r"^(\w+) = ", parameters.source, flags=re.M)
    for name in ("updates", "n_workers", "worker_steps", "epochs", "batches", "seed", "dashboard"):
        assert name in names


def test_the_readme_badge_and_the_set_up_cell_name_the_same_repository():
    repository = re.search(r'REPOSITORY = "([^"]+)"', NOTEBOOK.read_text().replace('\\"', '"')).group(1)
    badge = f"https://colab.research.google.com/github/{repository}/blob/main/ppo_breakout.ipynb"
    assert badge in (ROOT / "README.md").read_text().splitlines()[2], "the badge sits at the top of the README"


def test_run_all_trains_shows_the_curve_the_video_and_the_score(tmp_path):
    # the dashboard cell's branches, the server's start among them, are the next test's
    folder = project_copy(tmp_path)
    before = set(os.listdir(folder))
    out = folder / "out.ipynb"
    papermill.execute_notebook(
        str(folder / NOTEBOOK.name),
        str(out),
        parameters=dict(PARAMETERS, dashboard=False, more_updates=1),
        cwd=str(folder),
        progress_bar=False,
    )
    nb = nbformat.read(out, as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    html = "".join(o.data.get("text/html", "") for o in outputs if o.output_type == "display_data")
    assert "exit status 0; the run is in logs/ppo_breakout/" in text
    assert re.search(r"score:\s+mean [\d.]+\s+std", text)  # evaluate's score line
    # the last cell went on from the checkpoint: labml shows the comment under the run's name
    assert re.search(r"continues run \w+ from update 2", html)
    # the run's name (labml's) and its progress lines, the first and the last update's at least
    assert "ppo_breakout" in html and re.search(r"update 1 of \d+  [\d,]+ env steps", text)
    assert re.search(r"Finished: 3 updates, [\d,]+ env steps", text)
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and base64.b64decode(pngs[0].data["image/png"])[:4] == b"\x89PNG"
    (video,) = re.findall(r'src="data:video/mp4;base64,([^"]+)"', html)
    (folder / "shown.mp4").write_bytes(base64.b64decode(video))
    import imageio_ffmpeg

    meta = next(imageio_ffmpeg.read_frames(str(folder / "shown.mp4")))
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p"), meta  # what browsers play
    runs = list(folder.glob("logs/ppo_breakout/*/checkpoints/update_0000003.pt"))
    assert len(runs) == 1, "the resumed run wrote update 3"
    # what Run all wrote is in the run folders (git ignores logs/): the checkout is as it was
    (written,) = folder.glob("logs/ppo_breakout/*/game.mp4")
    left = set(os.listdir(folder)) - before - {out.name, "shown.mp4"}
    assert left <= {"logs", "__pycache__"}, left


def test_watch_shipped_plays_the_shipped_agent_with_its_video_and_trains_nothing(tmp_path):
    folder = project_copy(tmp_path)
    out = folder / "out.ipynb"
    # the dashboard asked for too: watching needs none, so none starts
    papermill.execute_notebook(
        str(folder / NOTEBOOK.name),
        str(out),
        parameters=dict(watch_shipped=True, dashboard=True, more_updates=5, eval_games=1),
        cwd=str(folder),
        progress_bar=False,
    )
    outputs = [o for cell in nbformat.read(out, as_version=4).cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    html = "".join(o.data.get("text/html", "") for o in outputs if o.output_type == "display_data")
    assert f"watch_shipped: no training; the cells below show {SHIPPED_AGENT}" in text
    assert "labml dashboard" not in text and "exit status" not in text
    assert not (folder / "logs" / "ppo_breakout").exists(), "no run was trained, nor resumed"
    assert f"checkpoint: {SHIPPED_AGENT} (update 10,000, 10,240,000 env steps)" in text
    (score,) = re.findall(r"game +1/1  seed +\d+  score +([\d.]+)", text)
    assert float(score) > 100, "a trained agent's game (a random policy scores about 1.5)"
    # the curve shown is the 10M run's, and the video the game just played
    (png,) = [o for o in outputs if "image/png" in o.get("data", {})]
    assert base64.b64decode(png.data["image/png"]) == (ROOT / SHIPPED_CURVE).read_bytes()
    (video,) = re.findall(r'src="data:video/mp4;base64,([^"]+)"', html)
    assert base64.b64decode(video) == (folder / "logs" / "breakout_10m_game.mp4").read_bytes()


COLAB_RECORDER = """
import sys, types
calls = []
output = types.SimpleNamespace(serve_kernel_port_as_window=lambda *a, **k: calls.append(("window", a, k)))
google = types.ModuleType("google")
google.colab = types.ModuleType("google.colab")
google.colab.output = output
sys.modules.update({"google": google, "google.colab": google.colab, "google.colab.output": output})
"""


def test_in_colab_the_set_up_clones_the_repository_and_the_dashboard_opens_through_the_port_proxy(
    tmp_path, monkeypatch
):
    """google.colab is a recorder; git clones this repository (its committed HEAD) where the cell
    asks GitHub for it, through git's url.<base>.insteadOf."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = cell_sources(nb)
    repository = re.search(r'REPOSITORY = "([^"]+)"', cells["Set up"]).group(1)
    port = free_port()
    check = f"""
assert Path.cwd().name == "ppo_breakout" and Path("ppo_breakout.py").exists()
assert calls == [("window", ({port},), {{"anchor_text": "Open the labml dashboard"}})], calls
assert dashboard_flag == "http://127.0.0.1:{port}"
assert not [r for r in requirements("requirements.txt") if r.startswith("torch")], "Colab's torch is kept"
"""
    # the same cell outside Colab, with the server now running: it prints the address to open
    local = "colab_output = None"
    sources = [
        COLAB_RECORDER,
        cells["Set up"],
        cells["Parameters"],
        f"dashboard_port = {port}",
        cells["The dashboard"],
        check,
        local,
        cells["The dashboard"],
    ]
    colab = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources], metadata=nb.metadata)
    nbformat.write(colab, tmp_path / "colab.ipynb")
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", f"url.file://{ROOT}.insteadOf")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", f"https://github.com/{repository}")
    papermill.execute_notebook(
        str(tmp_path / "colab.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(tmp_path), progress_bar=False
    )
    assert (tmp_path / "ppo_breakout" / "ppo_breakout.py").exists()
    outputs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs
    assert [o.text for o in outputs if o.output_type == "stream"] == [f"labml dashboard: http://127.0.0.1:{port}\n"]
    wait_for(lambda: not dashboard_answers(f"http://127.0.0.1:{port}"), 10, "the dashboard to stop with the kernel")


def run_cell(client, source: str, timeout: float = 300) -> str:
    """Run `source` in the kernel; its stream output, once it is idle again."""
    msg_id = client.execute(source)
    text = ""
    deadline = time.monotonic() + timeout
    while True:
        msg = client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 1))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return text


def printed(client, msg_id: str, text: str) -> bool:
    """The next message of the kernel is cell `msg_id` printing `text`."""
    msg = client.get_iopub_msg(timeout=30)
    return msg["parent_header"].get("msg_id") == msg_id and text in msg["content"].get("text", "")


def test_interrupting_the_training_cell_checkpoints_and_leaves_no_process_and_training_runs_again(tmp_path):
    from jupyter_client.manager import start_new_kernel

    folder = project_copy(tmp_path)
    cells = cell_sources(nbformat.read(NOTEBOOK, as_version=4))
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(folder))
    try:
        kernel = manager.provisioner.process.pid
        run_cell(client, cells["Set up"])
        run_cell(client, cells["Parameters"])
        run_cell(client, "\n".join(f"{k} = {v!r}" for k, v in dict(PARAMETERS, updates=500, dashboard=False).items()))
        run_cell(client, cells["The dashboard"])
        msg_id = client.execute(cells["Train"])
        wait_for(lambda: metrics_files(folder), 120, "the first update")
        manager.interrupt_kernel()  # what the notebook's Interrupt button sends
        text = ""
        while True:
            msg = client.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert "SIGINT: stopping after this update with a checkpoint" in text
        assert "exit status 130" in text
        (run,) = folder.glob("logs/ppo_breakout/*")
        updates = len((run / "metrics.jsonl").read_text().splitlines())
        assert 0 < updates < 500 and (run / "checkpoints" / f"update_{updates:07d}.pt").exists()
        assert not descendants(kernel), "no worker left"
        # the same kernel trains again: a new run, to its end
        run_cell(client, "updates = 2")
        text = run_cell(client, cells["Train"])
        assert "exit status 0" in text and len(list(folder.glob("logs/ppo_breakout/*"))) == 2
        assert not descendants(kernel)
        # and an Interrupt after training is the kernel's KeyboardInterrupt again, not the run's handler
        # (ipykernel drops an interrupt that comes before its cell runs: wait for the cell's own line)
        msg_id = client.execute("import time; print('sleeping', flush=True); time.sleep(30)")
        wait_for(lambda: printed(client, msg_id, "sleeping"), 30, "the cell to run", every=0)
        manager.interrupt_kernel()
        reply = client.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:  # the replies to the cells before
            reply = client.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_the_notebook_passes_ruff():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(NOTEBOOK)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout
    assert json.loads(NOTEBOOK.read_text())["nbformat"] == 4


@pytest.mark.parametrize("capability,expected", [((7, 5), None), ((8, 0), "bf16"), ((9, 0), "bf16"), ((6, 1), None)])
def test_auto_precision_takes_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, capability, expected):
    import torch

    import speed

    # a T4 (7.5) says is_bf16_supported() through emulation: the capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype = speed.autocast_dtype("auto", torch.device("cuda:0"))
    assert dtype == (torch.bfloat16 if expected else None)
    assert speed.autocast_dtype("fp32", torch.device("cuda:0")) is None
    assert speed.autocast_dtype("bf16", torch.device("cuda:0")) == torch.bfloat16
