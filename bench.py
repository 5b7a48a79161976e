"""
Speed of ppo_breakout on this machine, measured with the real Worker and Trainer code.

    python bench.py                      # the default configuration (8 workers x 128 steps, epochs 4)
    python bench.py --epochs 4           # the speed target's other configuration
    python bench.py --precision fp32 --no-channels-last   # the plain path, for comparison
    python bench.py --random-policy --episodes 30          # a random policy's whole-game score
    python bench.py --learn --steps 1000000 [training flags]  # a learning run, summarised
    python bench.py --summarise RUN_FOLDER [--steps N]        # the same summary for a run (at N steps)
    python bench.py --seeds RUN_FOLDER RUN_FOLDER ... [--steps N]   # several seeds' scores, their mean and sd
    python bench.py --ranks 2 [training flags]                # the loop under torchrun: 1 rank, then 2
    python bench.py --busy 1 [training flags]                 # the loop quiet, then beside 1 busy process

Prints, for one configuration: env-only steps/s through our Workers and through ale-py's C++
AtariVectorEnv with the same games and preprocessing (side by side, with the ratio); rollout
steps/s with the model in the loop; update samples/s; whole-loop env steps/s over several updates
after a warm-up; the ceiling that arithmetic alone puts on the loop (the model's FLOPs for an
update, at this machine's measured matrix-product rate); and the peak memory of all processes.
Figures are medians or totals of one run, so compare ratios within a run: machines here are
shared and noisy.

`--busy N` measures the whole loop quiet and beside N processes that each keep one core busy, in
turns (quiet, busy, quiet, busy: --measure updates each, after --warmup), with the seconds an
update spent sampling and training, and prints the busy speed's share of the quiet one: what a
machine that does other work leaves the training.

`--ranks N` measures the whole loop under torchrun instead (distributed.py): one run with 1 rank,
then one with N, each for --warmup + --measure updates in a temporary folder of its own holding a
copy of the script, with the same per-rank training flags (so N ranks sample N times the env steps
of an update). It prints each run's env steps/s over its measured updates, read from rank 0's
metrics.jsonl (the time stamps of the last warm-up and the last measured update, so rank 0's
files between updates count; with --warmup 0, the updates' own steps_per_second), their ratio, and
the same figure from the updates' steps_per_second alone (sampling and training, without the
files). On a GPU, N ranks share GPU 0 where there are fewer GPUs than ranks. N ranks on fewer
cores than they have workers and threads compete for them: there the ratio says what it costs.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

import cli
import distributed
import evaluate
import game
import ppo_breakout as ppo
import speed
from errors import Parser
from plots import read_metrics
from run_files import RunFileError

# the learning check's bar: the mean whole-game score of CleanRL's ppo_atari.py over its last 100
# games after 1M steps of Breakout (docs/results.md says where and how it was measured)
CLEANRL_1M_SCORE = 20.5
# --seeds' step counts: CleanRL's "10M" (its last update within 10,000,000 steps; update 9,765 of
# ours) and the whole default run
SEEDS_STEPS = (10_000_000, ppo.Configs.updates * ppo.Configs.n_workers * ppo.Configs.worker_steps)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    return f"{model}, {os.cpu_count()} cores, {system}"


def pss_mib(pids) -> float:
    """Proportional set size of `pids` together: pages shared by forked workers counted once."""
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024


class PeakMemory(threading.Thread):
    """Samples the memory of the trainer and its workers every 50 ms; `peak` is the largest sum."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.running = pids, 0.0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, pss_mib(self.pids))
            time.sleep(0.05)

    def stop(self) -> float:
        self.running = False
        self.join()
        return self.peak


def env_steps_per_second(step_all, n_workers: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        step_all(rng.integers(4, size=n_workers))
    return steps * n_workers / (time.perf_counter() - start)


def bench_workers(trainer: "ppo.Trainer", steps: int) -> float:
    """Random actions through the Trainer's own Workers, stepped in lockstep as `sample()` does."""

    def step_all(actions):
        for worker, action in zip(trainer.workers, actions):
            worker.send(ppo.Command.STEP, int(action))
        for worker in trainer.workers:
            worker.receive()

    step_all(np.zeros(trainer.n_workers, dtype=int))
    return env_steps_per_second(step_all, trainer.n_workers, steps)


def bench_vector_env(c: "ppo.Configs", steps: int) -> float:
    """ale-py's C++ AtariVectorEnv with the same protocol: no sticky actions, 4-frame max-pool,
    84x84 grey, 4-frame stack, 30 no-op starts, FIRE reset, 108,000-frame cap, one thread per core."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(
        c.game,
        c.n_workers,
        num_threads=os.cpu_count() or 1,
        repeat_action_probability=c.sticky_actions,
        frameskip=game.FRAME_SKIP,
        stack_num=game.FRAME_STACK,
        img_height=game.FRAME_SIZE,
        img_width=game.FRAME_SIZE,
        noop_max=game.NOOP_MAX,
        max_num_frames_per_episode=game.MAX_FRAMES,
        reward_clipping=c.clip_rewards,
        use_fire_reset=True,
    )
    try:
        env.reset(seed=c.seed)
        env.step(np.zeros(c.n_workers, dtype=np.int64))
        return env_steps_per_second(env.step, c.n_workers, steps)
    finally:
        env.close()


def model_flops(model: torch.nn.Module, device: torch.device) -> Tuple[float, float]:
    """Floating-point operations for one sample through `model`: its forward pass, and a training
    step's forward and backward passes, counted from its convolutions and linear layers (2 per
    multiply-add; activations, losses and Adam are under 1% of it). The backward pass computes
    each layer's weight gradient, as many multiply-adds as its forward, and each layer's input
    gradient but the first's: the frames need none."""
    macs = []  # per layer, in the order the forward pass runs them

    def count(layer, inputs, output):
        if isinstance(layer, torch.nn.Conv2d):
            # output[0]: one sample's [out_channels, height, width]
            macs.append(output[0].numel() * layer.in_channels // layer.groups * math.prod(layer.kernel_size))
        else:
            macs.append(layer.out_features * layer.in_features)

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *game.OBS_SHAPE), dtype=torch.uint8, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    forward = 2.0 * sum(macs)
    return forward, 3 * forward - 2.0 * macs[0]


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on `device` in `dtype`: near the most the model's
    convolutions and linear layers, matrix products in all but name, can reach there."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:])


def random_policy(c: "ppo.Configs", episodes: int):
    """The mean whole-game score of uniformly random actions, with the training protocol."""
    rng = np.random.default_rng(c.seed)
    scores, lengths = [], []
    for i in range(episodes):
        atari = game.Game(int(rng.integers(2**31)), c.game, clip_rewards=False)
        n_actions = len(atari.actions)
        info = evaluate.play_game(atari, lambda obs: int(rng.integers(n_actions)))
        scores.append(info["reward"])
        lengths.append(info["length"])
    print(
        f"random policy: game {c.game}, {episodes} games, score mean {np.mean(scores):.2f} sd {np.std(scores):.2f} "
        f"min {min(scores):.0f} max {max(scores):.0f}, length mean {np.mean(lengths):.0f}"
    )


def learn(argv, steps: int, target: float) -> int:
    """Train with ppo_breakout.py's own entry point for `steps` env steps and summarise its run
    from metrics.jsonl, in one line whose format stays the same so runs can be compared."""

    c = ppo.settings_from(ppo.Configs, vars(cli.build_parser().parse_args(argv)))
    updates = -(-steps // (c.n_workers * c.worker_steps))
    folder = Path(__file__).resolve().parent
    before = set(folder.glob("logs/ppo_breakout/*"))
    start = time.time()
    # The training runs in its own process group, so each stop reaches it once and from here: a
    # Ctrl-C at the terminal (which goes to bench.py's group), a SIGINT or SIGTERM sent to
    # bench.py alone, or the terminal's hang-up (unless `nohup` ignores it). The training then
    # ends its update with a checkpoint; a second signal, as for the training alone, stops it at
    # once. Outside the terminal's foreground group it must not be stopped for writing to it
    # (`stty tostop`): it inherits SIGTTOU ignored, and reads nothing from the terminal.
    command = [sys.executable, str(folder / "ppo_breakout.py"), *argv, "--updates", str(updates)]
    training, pending = [], []
    leave_terminal = cli.terminal_leaver()

    def pass_on(signum, frame):
        if signum == signal.SIGHUP:
            leave_terminal()  # its lines would fail; the run's files keep them
        if training:
            training[0].send_signal(signum)
        else:
            pending.append(signum)  # before the training started: sent as soon as it has

    previous = {signum: signal.signal(signum, pass_on) for signum in cli.stop_signals()}
    ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with subprocess.Popen(command, process_group=0, stdin=subprocess.DEVNULL) as p:
            signal.signal(signal.SIGTTOU, ttou)
            training.append(p)
            for signum in pending:
                p.send_signal(signum)
            code = p.wait()
    finally:
        signal.signal(signal.SIGTTOU, ttou)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    runs = set(folder.glob("logs/ppo_breakout/*")) - before
    if len(runs) != 1 or not (next(iter(runs)) / "metrics.jsonl").exists():
        return code  # it stopped before its first update; it said why
    print()  # labml's progress line ends without one
    summarise(runs.pop(), time.time() - start, code, target)
    return code


def summarise(
    run: Path,
    wall: Optional[float] = None,
    code: int = 0,
    target: float = CLEANRL_1M_SCORE,
    max_steps: Optional[int] = None,
):
    """One line for a run folder; without `wall`, the wall time is read from its metrics. A
    second line says when the mean of the last 100 games first passed `target`. `max_steps`
    summarises the run as it stood at that many env steps."""
    records = read_metrics(run)
    if max_steps is not None:
        records = [r for r in records if r["env_steps"] <= max_steps]
        if not records:
            raise RunFileError(f"no update of {run} ended within {max_steps} env steps")
    # every game's score in order, and the update after which the last 100 first passed `target`
    games: List[float] = []
    passed = None
    for r in records:
        games += [g[0] for g in r["games"]]
        if passed is None and len(games) >= 100 and np.mean(games[-100:]) > target:
            passed = r
    scores = games[-100:]
    first, last = records[0], records[-1]

    def elapsed(record: dict) -> float:
        # the first update's own time, then the clock from the end of the first update
        return record["time"] - first["time"] + first["env_steps"] / first["steps_per_second"]

    if wall is None:
        wall = elapsed(last)
    print(
        f"learn: run {run.name}, exit {code}, steps {last['env_steps']}, updates {last['update']}, "
        f"wall {wall:.0f} s, steps/s {last['env_steps'] / wall:.0f}, "
        + (
            f"score mean {np.mean(scores):.2f} sd {np.std(scores):.2f} over the last {len(scores)} games"
            if scores
            else "no game finished yet"
        )
    )
    if passed is None:
        print(f"target: mean of 100 games never above {target}")
    else:
        print(f"target: mean of 100 games first above {target} at {passed['env_steps']} steps, {elapsed(passed):.0f} s")


def seeds(runs: List[Path], step_counts=SEEDS_STEPS):
    """For each step count, each run's mean of its last 100 games at its last update within it, and
    across the runs that reached it their mean ± population sd (the ± of CleanRL's and
    openrlbenchmark's tables) with the sample sd beside it. A run that has not reached a step count
    yet (its next update would still be within it) is named with where it stands."""
    records = [(run, read_metrics(run)) for run in runs]
    print(
        f"seeds: {len(runs)} runs; a run's score is the mean of its last 100 games at its last update "
        "within the step count"
    )
    for steps in step_counts:
        scores, parts = [], []
        for run, run_records in records:
            last = run_records[-1]
            steps_per_update = last["env_steps"] // last["update"]
            if last["env_steps"] + steps_per_update <= steps:
                parts.append(f"{run.name} not there yet (update {last['update']:,}, {last['env_steps']:,} steps)")
                continue
            within = [r for r in run_records if r["env_steps"] <= steps]
            games = [g[0] for r in within for g in r["games"]][-100:]
            if not games:
                parts.append(f"{run.name} no game finished")
                continue
            scores.append(float(np.mean(games)))
            reached = within[-1]
            parts.append(f"{run.name} {scores[-1]:.2f} (update {reached['update']:,}, {reached['env_steps']:,} steps)")
        print(f"at {steps:,}: " + "; ".join(parts))
        if len(scores) >= 2:
            print(
                f"  mean of {len(scores)}: {np.mean(scores):.2f} ± {np.std(scores):.2f} (population sd), "
                f"sample sd {np.std(scores, ddof=1):.2f}"
            )


def training_flags(c: "ppo.Configs", r: "ppo.RunSettings") -> List[str]:
    """The flags that give `c` and `r` to ppo_breakout.py: each setting that differs from its
    default, but --updates and --device-ids, which compare_ranks sets for each run."""
    argv = []
    for settings in (c, r):
        default = type(settings)()
        for field in dataclasses.fields(settings):
            value = getattr(settings, field.name)
            if field.name in ("updates", "device_ids") or value == getattr(default, field.name):
                continue
            flag = cli.flag_of(field.name)
            if field.type is bool:
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
    return argv


def device_ids(device: torch.device, ranks: int, gpus: int) -> str:
    """--device-ids for `ranks` ranks on `device`: all on its GPU where there are fewer GPUs than
    ranks or the device names one (cuda:1), else empty (rank r on GPU r, distributed.py's default)."""
    if device.type != "cuda" or (device.index is None and ranks <= gpus):
        return ""
    return ",".join([str(device.index or 0)] * ranks)


def loop_rate(records: List[dict], warmup: int) -> float:
    """Env steps/s of the updates after the first `warmup`: from the time stamps of the last
    warm-up and the last update, or without a warm-up from the updates' own steps_per_second."""
    if warmup:
        before, last = records[warmup - 1], records[-1]
        return (last["env_steps"] - before["env_steps"]) / (last["time"] - before["time"])
    return update_rate(records, 0)


def update_rate(records: List[dict], warmup: int) -> float:
    """Env steps/s of the updates after the first `warmup`, from their steps_per_second: their
    sampling and training, without what the run does between updates (its files)."""
    steps = [r["env_steps"] - (p["env_steps"] if p else 0) for p, r in zip([None, *records], records)][warmup:]
    return sum(steps) / sum(s / r["steps_per_second"] for s, r in zip(steps, records[warmup:]))


class RunFailed(Exception):
    """A torchrun run that ended without its updates: one line saying which and why."""


BUSY_LOOP = "while True: pass"  # one thread that always wants a core, as another program may


def busy_core(c: "ppo.Configs", r: "ppo.RunSettings", busy: int, warmup: int, measure: int) -> int:
    """The whole loop's env steps/s quiet, then beside `busy` one-thread busy processes, A B A B in
    one run (the machine's drift falls on both alike), and the busy figure's share of the quiet one."""
    rates = {"quiet": [], "busy": []}
    with ppo.Trainer(c, r) as trainer:
        for _ in range(warmup):
            trainer.train(trainer.sample())
        for phase in ("quiet", "busy", "quiet", "busy"):
            count = busy if phase == "busy" else 0
            spinners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
            sampling = training = 0.0
            try:
                for _ in range(measure):
                    start = time.perf_counter()
                    samples = trainer.sample()
                    sampled = time.perf_counter()
                    trainer.train(samples)
                    sampling, training = sampling + sampled - start, training + time.perf_counter() - sampled
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
            rates[phase].append(measure * trainer.batch_size / (sampling + training))
            beside = f"beside {busy} busy process{'es' if busy > 1 else ''}" if phase == "busy" else "quiet"
            print(f"{beside + ':':24} {rates[phase][-1]:8.0f} env steps/s over {measure} updates")
            split = f"an update: sampling {sampling / measure:.2f} s, training {training / measure:.2f} s"
            print(f"{'':24} {split}", flush=True)
    share = statistics.mean(rates["busy"]) / statistics.mean(rates["quiet"])
    print(f"busy core: {share:.2f} of the quiet speed beside {busy} one-thread busy process(es), {os.cpu_count()} CPUs")
    return 0


def compare_ranks(c: "ppo.Configs", r: "ppo.RunSettings", ranks: int, warmup: int, measure: int) -> int:
    """The whole loop under torchrun with 1 rank and with `ranks`, one after the other; prints
    their env steps/s and the ratio. Its exit status: 1 if a run failed, 128 + the signal if
    stopped. The first Ctrl-C, SIGTERM or hang-up goes to the running torchrun, which passes it on
    to its ranks (each ends its update, as under torchrun alone); a second kills the run at once."""
    device = ppo.parse_device(r.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ids = device_ids(device, ranks, gpus)
    dtype = speed.autocast_dtype(r.precision, device)
    if device.type == "cuda":
        gpu = device.index or 0
        where = f"device cuda:{gpu} ({torch.cuda.get_device_name(gpu)}), " + (
            f"{ranks} ranks share GPU {gpu} (--device-ids {ids})" if ids else f"{ranks} ranks on GPUs 0-{ranks - 1}"
        )
    else:
        where = "device cpu"
    # torchrun gives each of several ranks 1 torch thread, unless OMP_NUM_THREADS says otherwise
    threads = os.environ.get("OMP_NUM_THREADS")
    print(f"machine:   {machine()}")
    print(
        f"config:    {c.game}, {c.n_workers} workers x {c.worker_steps} steps per rank, {c.batches} minibatches, "
        f"epochs {c.epochs}, {where}, precision {'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}, "
        f"torch threads per rank {threads or torch.get_num_threads()} (1 rank) and {threads or 1} ({ranks} ranks)",
        flush=True,
    )
    argv = [*training_flags(c, r), "--dashboard", "off", "--updates", str(warmup + measure)]
    stops, job = [], []  # the stop signals received; the torchrun process while one runs
    leave_terminal = cli.terminal_leaver()

    def on_stop(signum, frame):
        if signum == signal.SIGHUP:
            leave_terminal()  # its lines would fail
        stops.append(signum)
        if job and len(stops) == 1:
            os.kill(job[0].pid, signum)  # not reaped before the wait below, so the pid is still its
        elif job:
            kill_job(job[0].pid)

    previous = {signum: signal.signal(signum, on_stop) for signum in cli.stop_signals()}
    rates, n = {}, 1
    try:
        for n in (1, ranks):
            if stops:
                break
            run_ids = ids and ",".join(ids.split(",")[:n])
            rates[n] = run_under_torchrun(n, [*argv, "--device-ids", run_ids], warmup, warmup + measure, stops, job)
    except RunFailed as e:
        if not stops:
            print(f"bench.py: error: {e}", file=sys.stderr)
            return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stops:
        name = "Ctrl-C" if stops[0] == signal.SIGINT else signal.Signals(stops[0]).name
        print(f"bench.py: stopped by {name} during the {n}-rank run", file=sys.stderr)
        return 128 + stops[0]
    (loop_1, one), (loop_n, many) = rates[1], rates[ranks]
    after = f"over {measure} updates after {warmup} warm-up"
    print(
        f"ranks:     1 rank {loop_1:8.0f} env steps/s | {ranks} ranks {loop_n:8.0f} env steps/s | "
        f"ratio {loop_n / loop_1:.2f}, {after}"
    )
    print(
        f"in update: 1 rank {one:8.0f} env steps/s | {ranks} ranks {many:8.0f} env steps/s | "
        f"ratio {many / one:.2f}, sampling and training alone (steps_per_second)"
    )
    return 0


def descendants(pid: int) -> List[int]:
    """The processes under `pid` now (Linux /proc)."""
    found, parents = [], [pid]
    while parents:
        children = []
        for parent in parents:
            for task in Path(f"/proc/{parent}/task").glob("*"):
                with contextlib.suppress(OSError, ValueError):
                    children += [int(c) for c in (task / "children").read_text().split()]
        found += children
        parents = children
    return found


def kill_job(pid: int):
    """SIGKILL to a torchrun process not yet reaped, its process group and everything under it:
    its ranks run in sessions of their own, and their game workers die with them."""
    under = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # its process group, held by its pid until it is reaped
    for target in under:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def run_under_torchrun(
    n: int, argv: List[str], warmup: int, updates: int, stops: list, job: list
) -> Tuple[float, float]:
    """`torchrun --standalone --nproc_per_node=n ppo_breakout.py argv...` for `updates` updates in
    a temporary folder holding a copy of the script; the env steps/s of its updates after `warmup`
    (loop_rate, update_rate). Nothing it started outlives it, nor does the folder."""
    import tempfile

    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="bench_ranks_") as temporary:
        folder = Path(temporary)
        for name in cli.SCRIPT_FILES:
            (folder / name).write_bytes((here / name).read_bytes())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        with open(folder / "torchrun.log", "w") as log:
            # a process group of its own: a Ctrl-C at the terminal reaches it once, from here;
            # torchrun's own temporary files (its log folder) go into this folder
            p = subprocess.Popen(
                [*command, "ppo_breakout.py", *argv],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
                env={**os.environ, "TMPDIR": str(folder)},
            )
        try:
            job.append(p)
            if stops:  # a stop came while it started
                os.kill(p.pid, stops[0])
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
        finally:
            job.clear()
            kill_job(p.pid)  # nothing after it has ended; everything if bench.py itself failed here
            code = p.wait()
        if code != 0:
            lines = (folder / "torchrun.log").read_text(errors="replace").splitlines()
            said = [line for line in lines if line.startswith("ppo_breakout.py: error:") or line.startswith("error:")]
            raise RunFailed(f"the {n}-rank run failed with exit {code}" + (f": {said[0]}" if said else ""))
        runs = list(folder.glob("logs/ppo_breakout/*"))
        records = read_metrics(runs[0]) if len(runs) == 1 and (runs[0] / "metrics.jsonl").exists() else []
        if len(records) != updates:
            raise RunFailed(f"the {n}-rank run wrote {len(records)} updates' metrics, not {updates}")
        return loop_rate(records, warmup), update_rate(records, warmup)


def main():
    # every ppo_breakout.py flag (--epochs, --n-workers, --precision, ...) with the same default
    parser = Parser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0],
        parents=[cli.build_parser(add_help=False)],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--env-steps", type=int, default=400, help="vector steps for the env-only figures")
    parser.add_argument("--warmup", type=int, default=1, help="updates before the whole-loop timing")
    parser.add_argument("--measure", type=int, default=5, help="updates timed for the whole-loop figure")
    parser.add_argument("--memory-updates", type=int, default=2, help="updates run for the peak-memory figure")
    parser.add_argument("--random-policy", action="store_true", help="only measure a random policy's score")
    parser.add_argument("--episodes", type=int, default=30, help="games for --random-policy")
    parser.add_argument("--learn", action="store_true", help="only run a learning run of --steps env steps")
    parser.add_argument(
        "--steps", type=int, default=None, help="env steps for --learn (default 1,000,000); --summarise stops there"
    )
    parser.add_argument(
        "--ranks",
        type=int,
        metavar="N",
        help="only measure the whole loop under torchrun with 1 rank and with N (2 or more), side by side",
    )
    parser.add_argument(
        "--busy",
        type=int,
        metavar="N",
        help="only measure the whole loop quiet and beside N one-thread busy processes, A B A B",
    )
    parser.add_argument("--summarise", type=Path, metavar="RUN_FOLDER", help="only print --learn's line for a run")
    parser.add_argument(
        "--seeds",
        type=Path,
        nargs="+",
        metavar="RUN_FOLDER",
        help=f"only print each run's score at --steps (without it, at {SEEDS_STEPS[0]:,} and {SEEDS_STEPS[1]:,}) "
        "and their mean ± sd",
    )
    parser.add_argument(
        "--target", type=float, default=CLEANRL_1M_SCORE, help="--learn and --summarise say when the score passed it"
    )
    args, _ = parser.parse_known_args()
    if args.steps is not None and args.steps <= 0:
        parser.error(f"argument --steps: must be positive, got {args.steps}")
    if args.ranks is not None and args.ranks < 2:
        parser.error(f"argument --ranks: must be 2 or more, got {args.ranks}")
    for name, least in (("env_steps", 1), ("warmup", 0), ("measure", 1), ("memory_updates", 0), ("episodes", 1)):
        if getattr(args, name) < least:
            parser.error(f"argument --{name.replace('_', '-')}: must be {least} or more, got {getattr(args, name)}")
    if args.summarise:
        try:
            return summarise(args.summarise, target=args.target, max_steps=args.steps)
        except RunFileError as e:
            parser.error(f"argument --summarise: {e}")
    if args.seeds:
        try:
            return seeds(args.seeds, SEEDS_STEPS if args.steps is None else (args.steps,))
        except RunFileError as e:
            parser.error(f"argument --seeds: {e}")
    if args.learn:
        argv = sys.argv[1:]
        argv.remove("--learn")
        for flag in ("--steps", "--target"):
            if flag in argv:
                i = argv.index(flag)
                del argv[i : i + 2]
        return learn(argv, args.steps or 1_000_000, args.target)
    args = parser.parse_args()
    c, r = ppo.settings_from(ppo.Configs, vars(args)), ppo.settings_from(ppo.RunSettings, vars(args))
    errors = cli.config_errors(c, r)
    if errors:
        name, problem = errors[-1]
        parser.error(f"argument {cli.flag_of(name)}: {problem}")
    if args.random_policy:
        return random_policy(c, args.episodes)
    if args.busy is not None:
        if args.busy < 1:
            parser.error(f"argument --busy: must be 1 or more, got {args.busy}")
        warnings.filterwarnings("ignore", message="Register dynamic schedules")
        return busy_core(c, r, args.busy, args.warmup, args.measure)
    if args.ranks:
        if r.device_ids:
            parser.error("argument --device-ids: --ranks chooses each run's GPUs itself")
        device = ppo.parse_device(r.device)
        ids = device_ids(device, args.ranks, torch.cuda.device_count() if device.type == "cuda" else 0)
        try:  # what the ranks would refuse, refused here: --backend nccl on the CPU, no GPU 1
            distributed.device_for(dataclasses.replace(r, device_ids=ids), 0, args.ranks)
        except ValueError as e:
            parser.error(str(e))
        return compare_ranks(c, r, args.ranks, args.warmup, args.measure)

    # the Trainer's dynamic hyperparameters outside a labml experiment: fine here, nothing to steer
    warnings.filterwarnings("ignore", message="Register dynamic schedules")
    with ppo.Trainer(c, r) as trainer:
        dtype = trainer.autocast_dtype or torch.float32  # what the model computes in
        print(f"machine:   {machine()}")
        gpu = f", GPU {torch.cuda.get_device_name(trainer.device)}" if trainer.device.type == "cuda" else ""
        print(
            f"software:  torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
            f"numpy {np.__version__}{gpu}"
        )
        print(
            f"config:    {c.game}, {c.n_workers} workers x {c.worker_steps} steps, {c.batches} minibatches, "
            f"epochs {c.epochs}, device {trainer.device}, "
            f"precision {'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}, "
            f"channels_last {r.channels_last}, reuse freed memory {trainer.reusing_freed_memory}"
            + (f", cuda graphs {trainer.graphs}" if trainer.device.type == "cuda" else "")
            + (f", train threads {r.train_threads}" if trainer.device.type == "cpu" else "")
        )

        ours = bench_workers(trainer, args.env_steps)
        vector = bench_vector_env(c, args.env_steps)
        print(
            f"env only:  Workers {ours:8.0f} steps/s | AtariVectorEnv {vector:8.0f} steps/s | "
            f"ratio {ours / vector:.2f}"
        )

        for _ in range(args.warmup):
            trainer.train(trainer.sample())
        rollout, update, loop, faults = [], [], [], 0
        for _ in range(args.measure):
            start = time.perf_counter()
            samples = trainer.sample()
            sampled = time.perf_counter()
            faults -= resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            trainer.train(samples)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            done = time.perf_counter()
            rollout.append(trainer.batch_size / (sampled - start))
            update.append(trainer.batch_size * trainer.epochs() / (done - sampled))
            loop.append(done - start)
        print(f"rollout:   {statistics.median(rollout):8.0f} env steps/s with the model in the loop")
        print(
            f"update:    {statistics.median(update):8.0f} samples/s through forward+backward+Adam "
            f"({1000 * trainer.mini_batch_size / statistics.median(update):.0f} ms per minibatch "
            f"of {trainer.mini_batch_size})"
        )
        # what --reuse-freed-memory spares: with glibc's defaults each minibatch maps its tens of MB
        # anew and faults them in page by page (compare with --no-reuse-freed-memory)
        minibatches = args.measure * trainer.epochs() * (trainer.batch_size // trainer.mini_batch_size)
        print(
            f"faults:    {faults / minibatches:8.0f} page faults a minibatch in the trainer "
            f"(reuse freed memory {trainer.reusing_freed_memory})"
        )
        print(
            f"loop:      {args.measure * trainer.batch_size / sum(loop):8.0f} env steps/s over "
            f"{args.measure} updates after {args.warmup} warm-up"
        )
        # the loop's bound from arithmetic alone: every update's training steps and rollout forward
        # passes, at the rate of a large matrix product here (measured after the timings)
        forward, train_step = model_flops(trainer.model, trainer.device)
        per_update = trainer.batch_size * (trainer.epochs() * train_step + forward) + trainer.n_workers * forward
        rate = matmul_rate(trainer.device, dtype)
        print(
            f"ceiling:  {trainer.batch_size * rate / per_update:8.0f} env steps/s if an update's "
            f"{per_update / 1e9:.3g} GFLOP ({train_step / 1e6:.1f} MFLOP a sample's training step x "
            f"{trainer.epochs()} epochs, {forward / 1e6:.1f} its rollout forward) ran at "
            f"{rate / 1e9:.0f} GFLOP/s, this machine's {'bf16' if dtype == torch.bfloat16 else 'fp32'} "
            f"matrix product"
        )
        # memory after the timings, over updates of its own: reading every process's smaps_rollup
        # 20 times a second costs enough kernel time to slow the timed work by up to 2x
        if args.memory_updates == 0:
            print("memory:    not measured (--memory-updates 0)")
        else:
            memory = PeakMemory([os.getpid()] + [w.process.pid for w in trainer.workers])
            memory.start()
            for _ in range(args.memory_updates):
                trainer.train(trainer.sample())
            print(
                f"memory:    {memory.stop():8.0f} MiB peak, trainer + {len(trainer.workers)} workers "
                f"(sum of proportional set sizes, sampled every 50 ms over {args.memory_updates} more updates)"
            )
        if trainer.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20
            print(f"gpu:       {peak:8.0f} MiB peak allocated by torch on {trainer.device}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the Trainer has joined its workers on the way out
        print("bench.py: stopped by Ctrl-C; the figures above were measured before it", file=sys.stderr)
        sys.exit(130)
