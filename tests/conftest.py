"""What every test shares: the tiny configuration, the check that no process is left, one real
training run for the tests that only read its files, and the ways to start, stop and wait for the
programs under test."""

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the files `python ppo_breakout.py` needs beside it
from cli import SCRIPT_FILES, flag_of  # noqa: E402
from ppo_breakout import Trainer, settings  # noqa: E402
from run_files import restore  # noqa: E402

# The one configuration the tests train with: the smallest that still has several workers,
# several minibatches and several samples per minibatch.
TINY = dict(n_workers=2, worker_steps=16, batches=2, epochs=1, seed=5)


def flags(config: dict) -> List[str]:
    """`config` as command-line flags: {"n_workers": 2} -> ["--n-workers", "2"]."""
    return [arg for name, value in config.items() for arg in (flag_of(name), str(value))]


TINY_FLAGS = flags(TINY)


def resumed_trainer(state: dict, **overrides) -> Trainer:
    """A Trainer that goes on from the checkpoint `state` as `--resume` does: with the checkpoint's
    configuration, `overrides` given over it."""
    trainer = Trainer(*settings(**{**state["configs"], **overrides}), first_update=state["update"])
    try:
        restore(trainer, state)
    except BaseException:
        trainer.destroy()
        raise
    return trainer
# a run far longer than any test waits for: the tests stop it
LONG_RUN = ["--updates", "100000", *TINY_FLAGS]


def copy_script(folder: Path, *also: str) -> Path:
    """Copy the script and its tools (and the files named in `also`, such as bench.py) into
    `folder`, so a run started there writes its run folder there."""
    for name in (*SCRIPT_FILES, *also):
        (folder / name).write_bytes((ROOT / name).read_bytes())
    return folder


@pytest.fixture
def script_dir(tmp_path):
    """A folder holding a copy of the script, so a CLI run writes its run folder there."""
    return copy_script(tmp_path)


# ## No process is left
#
# The test process is a child subreaper: a process whose parent dies (a worker of a killed trainer)
# is re-parented to it rather than to init, so it stays a descendant here, and the one check below,
# run after every test, sees every process any test left behind.

with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER (Linux)


def _alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped) is not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid: int) -> set:
    """The live child processes of `pid`."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return {c for c in found if _alive(c)}


def descendants(pid: Optional[int] = None) -> set:
    """The live descendants of `pid` (default: this test process)."""
    found, parents = set(), [os.getpid() if pid is None else pid]
    while parents:
        new = set().union(*(children(p) for p in parents)) - found
        found |= new
        parents = list(new)
    return found


def assert_gone(pids: Iterable[int], timeout: float = 10.0):
    """Every process in `pids` has exited, or does within `timeout` seconds; fails naming the others."""
    pids = set(pids)
    deadline = time.monotonic() + timeout
    while {p for p in pids if _alive(p)} and time.monotonic() < deadline:
        time.sleep(0.02)
    left = {p: _command_line(p) for p in pids if _alive(p)}
    assert not left, f"processes left behind: {left}"


def _command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    return "?"


# the processes a module- or session-scoped fixture keeps running from one test to the next
KEPT_RUNNING: set = set()


@pytest.fixture(autouse=True)
def no_process_left():
    """Fails a test that leaves a process running: one it started, or any that one started."""
    before = descendants()
    yield
    left = descendants() - before - KEPT_RUNNING
    try:
        assert_gone(left)
    finally:  # so a failure here does not slow every later test
        for pid in filter(_alive, left):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ## Running the programs


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


def run_main(main: Callable, *args) -> int:
    """A program's `main(argv)` called in the test process: its exit status, argparse's included,
    as `sys.exit(main())` would end with it. The test reads its output with capsys."""
    path = list(sys.path)  # ppo_breakout.main() puts its folder first
    try:
        return main(list(args))
    except SystemExit as e:
        return e.code
    finally:
        sys.path[:] = path


def files_of_at_most(size: int):
    """A preexec_fn under which, as on a full disk, a write past `size` bytes fails (EFBIG, with
    SIGXFSZ ignored) instead of killing the process; ffmpeg and the workers inherit it."""

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


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
    `env` adds to the environment. Its output is unbuffered, so a test can wait for a line."""

    def as_in_a_terminal():
        signals_as_in_a_terminal()
        if preexec_fn:
            preexec_fn()

    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=as_in_a_terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def ctrl_c(process: subprocess.Popen, *waits: Callable, timeout: float = 60) -> Tuple[str, str]:
    """Press Ctrl-C in `process`'s terminal (its process group) once after each wait returns, and
    return its (stdout, stderr) once it exits; if it hangs, its group is killed when the test fails."""
    try:
        for wait in waits:
            wait()
            with contextlib.suppress(ProcessLookupError):  # it ended already: the test's checks say so
                os.killpg(process.pid, signal.SIGINT)
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def read_until(stream, predicate: Callable[[str], bool], what: str) -> List[str]:
    """Read lines from `stream` until one satisfies `predicate`; the lines read, that one last."""
    lines = []
    for line in stream:
        lines.append(line)
        if predicate(line):
            return lines
    raise AssertionError(f"the output ended before {what}: {''.join(lines)[-2000:]}")


def wait_for(condition: Callable, timeout: float, what: str, every: float = 0.05):
    """Check `condition` every `every` seconds until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def metrics_files(folder: Path) -> List[Path]:
    return list(folder.glob("logs/ppo_breakout/*/metrics.jsonl"))


def wait_for_first_update(folder: Path, process: subprocess.Popen, timeout: float = 120):
    """Wait until a run under `folder` has written its first update's metrics."""

    def written():
        assert process.poll() is None, process.communicate()[1][-2000:]
        return metrics_files(folder)

    wait_for(written, timeout, "the first update")


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
        while not metrics_files(cwd):
            assert process.poll() is None and time.monotonic() < deadline, output.decode(errors="replace")[-2000:]
            if select.select([terminal], [], [], 0.05)[0]:  # read, or the program would block on a full terminal
                output += os.read(terminal, 65536)
        before_hang_up = descendants(process.pid)
        os.close(terminal)
        os.killpg(process.pid, signal.SIGHUP)
        process.wait(timeout=60)
        return process, before_hang_up
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def checkpointed_last_update(folder: Path) -> Tuple[Path, int]:
    """The one run under `folder` and its last update, which it ended with a checkpoint of."""
    (run,) = folder.glob("logs/ppo_breakout/*")
    last_update = len((run / "metrics.jsonl").read_text().splitlines())
    assert (run / "checkpoints" / f"update_{last_update:07d}.pt").exists()
    return run, last_update


def answers(url: str) -> bool:
    """`url` answers a GET with success (not: nothing listens, or 404)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


def dashboard_answers(url: str) -> bool:
    """A labml dashboard answers at `url`."""
    return answers(f"{url}/api/v1/auth/is_logged")


def free_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ## One real training run, shared


@pytest.fixture(scope="session")
def short_cli_run(tmp_path_factory) -> SimpleNamespace:
    """A real 4-update training run from the command line, with the tiny configuration,
    checkpointing every 2 updates, told to report to a dashboard URL where nothing answers:
    `run` is its run folder, `result` its finished process (exit status and output)."""
    folder = copy_script(tmp_path_factory.mktemp("short_run"))
    url = f"http://127.0.0.1:{free_port()}"
    args = ["--updates", "4", *TINY_FLAGS, "--checkpoint-every", "2", "--dashboard", url]
    result = run_python(folder, "ppo_breakout.py", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    return SimpleNamespace(run=run, result=result, dashboard=url, folder=folder)


@pytest.fixture(scope="session")
def short_run(short_cli_run) -> Path:
    """The run folder of `short_cli_run`: 4 updates of 2 x 16 steps, checkpoints at 2 and 4."""
    return short_cli_run.run
