import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child_pids(pid: int = None) -> set:
    """Live child processes of `pid` (default: this test process), read from /proc."""
    pid = os.getpid() if pid is None else pid
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return {c for c in children if _alive(c)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def no_leftover_children():
    """Fails the test if it leaves a child process behind."""
    before = child_pids()
    yield
    left = child_pids() - before
    assert not left, f"child processes left behind: {left}"


def run_python(cwd, script, *args, timeout: float = 300, preexec_fn=None) -> subprocess.CompletedProcess:
    """`python script args...` run in `cwd`, its output captured as text."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def files_of_at_most(size: int):
    """A preexec_fn under which, as on a full disk, a write past `size` bytes fails (EFBIG, with
    SIGXFSZ ignored) instead of killing the process; ffmpeg and the workers inherit it."""

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def copy_script(folder: Path, *also: str) -> Path:
    """Copy the script (and the files named in `also`, such as bench.py) into `folder`."""
    for name in ("ppo_breakout.py", ".labml.yaml", *also):
        (folder / name).write_bytes((ROOT / name).read_bytes())
    return folder


def signals_as_in_a_terminal():
    """SIGINT and SIGHUP at their defaults, as for a program started at a terminal, even where the
    tests themselves run with them ignored (a background job of a script ignores SIGINT, `nohup`
    SIGHUP), which their programs would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_in_own_session(
    cwd: Path, script: str, *args, env: Optional[dict] = None, preexec_fn=None
) -> subprocess.Popen:
    """`python script args...` in a new process group, so a test can send it the terminal's Ctrl-C;
    `env` adds to the environment."""

    def as_in_a_terminal():
        signals_as_in_a_terminal()
        if preexec_fn:
            preexec_fn()

    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        preexec_fn=as_in_a_terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def ctrl_c(process: subprocess.Popen, *waits, timeout: float = 60) -> Tuple[str, str]:
    """Press Ctrl-C in `process`'s terminal (its process group) once after each wait, seconds to
    sleep or a function to call, and return its (stdout, stderr) once it exits; if it hangs, its
    group is killed when the test fails."""
    try:
        for wait in waits:
            wait() if callable(wait) else time.sleep(wait)
            with contextlib.suppress(ProcessLookupError):  # it ended already: the test's checks say so
                os.killpg(process.pid, signal.SIGINT)
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def hang_up_after_first_update(cwd: Path, script: str, *args, timeout: float = 120) -> Tuple[subprocess.Popen, set]:
    """Run `python script args...` in a new session on a pseudo-terminal until a run under `cwd`
    has written its first update, then hang up as a dropped ssh connection does: the terminal goes
    (writes to it fail) and the shell sends its job's process group one SIGHUP. Returns the ended
    process and the pids of its descendants just before the hang-up."""
    terminal, its_end = os.openpty()
    process = subprocess.Popen(
        [sys.executable, script, *args],
        cwd=cwd,
        stdin=its_end,
        stdout=its_end,
        stderr=its_end,
        start_new_session=True,
        preexec_fn=signals_as_in_a_terminal,
    )
    os.close(its_end)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while not list(cwd.glob("logs/ppo_breakout/*/metrics.jsonl")):
            assert process.poll() is None and time.monotonic() < deadline, output.decode(errors="replace")[-2000:]
            if select.select([terminal], [], [], 0.2)[0]:
                output += os.read(terminal, 65536)
        descendants, parents = set(), [process.pid]
        while parents:
            children = set().union(*(child_pids(p) for p in parents))
            descendants |= children
            parents = list(children)
        os.close(terminal)
        os.killpg(process.pid, signal.SIGHUP)
        process.wait(timeout=60)
        return process, descendants
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def checkpointed_last_update(folder: Path) -> Tuple[Path, int]:
    """The one run under `folder` and its last update, which it ended with a checkpoint of."""
    (run,) = folder.glob("logs/ppo_breakout/*")
    last_update = len((run / "metrics.jsonl").read_text().splitlines())
    assert (run / "checkpoints" / f"update_{last_update:07d}.pt").exists()
    return run, last_update


def wait_for_first_update(folder: Path, process: subprocess.Popen, timeout: float = 120):
    """Wait until a run under `folder` has written its first update's metrics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(folder.glob("logs/ppo_breakout/*/metrics.jsonl")):
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.2)
    raise AssertionError("no update within the timeout")


@pytest.fixture
def script_dir(tmp_path):
    """A folder holding a copy of the script, so a CLI run writes its run folder there."""
    return copy_script(tmp_path)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> Path:
    """The run folder of a real 4-update training run with 2 workers, checkpointing every 2."""
    folder = copy_script(tmp_path_factory.mktemp("short_run"))
    result = run_python(
        folder,
        "ppo_breakout.py",
        "--updates",
        "4",
        "--n-workers",
        "2",
        "--worker-steps",
        "64",
        "--epochs",
        "1",
        "--checkpoint-every",
        "2",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    return run
