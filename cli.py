"""
The command line of `python ppo_breakout.py` (`main`), and the run it starts (`train`): the
experiment trained with labml, reporting to the dashboard, keeping its run folder.

- The flags are made from `Configs` and `RunSettings` (each setting's default and help are declared
  there, once); bad input is refused with one line and exit 2 before anything starts; `--resume`
  goes on from a checkpoint. The subcommands are their own files': evaluate.py, plots.py,
  run_files.py (export) and dashboard.py.
- How a run stops: the first Ctrl-C, SIGTERM or terminal hang-up (SIGHUP: the terminal closed, an
  ssh connection dropped) lets the update finish and ends the run with a checkpoint, exit 128 + the
  signal; a second one stops at once. Under `nohup` a hang-up stays ignored.
"""

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from labml import experiment

import dashboard
import evaluate
import plots
import ppo_breakout as ppo
import run_files
from errors import Parser, device_problem, fail, seed_problem
from game import RomError, rom_path

# `python ppo_breakout.py NAME ...`: the file that owns each subcommand, and its main
SUBCOMMANDS = {"evaluate": evaluate.main, "plot": plots.main, "export": run_files.main, "dashboard": dashboard.main}
# what `python ppo_breakout.py` needs beside it: the modules it imports, labml's project file
SCRIPT_FILES = (
    "ppo_breakout.py",
    "game.py",
    "speed.py",
    "errors.py",
    "cli.py",
    "run_files.py",
    "plots.py",
    "evaluate.py",
    "dashboard.py",
    "distributed.py",
    ".labml.yaml",
)


def subcommand(argv: List[str]) -> bool:
    return bool(argv) and argv[0] in SUBCOMMANDS


def main(argv: Optional[List[str]] = None) -> int:
    """`python ppo_breakout.py [flags]`, or one of its subcommands; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if subcommand(argv):
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and not argv[0].startswith("-"):  # training takes flags only: a word first is a subcommand mistyped
        near = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return fail("ppo_breakout.py", f"no subcommand {argv[0]!r}: {hint}the subcommands are {', '.join(SUBCOMMANDS)}")
    configs, run_settings, checkpoint, comment, dashboard_flag = parse(argv)  # one line, exit 2 on bad input
    return train(configs, run_settings, checkpoint, comment, dashboard_flag, given=tuple(given_flags(argv)))


def flag_of(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def build_parser(add_help: bool = True, defaults: bool = True) -> argparse.ArgumentParser:
    """The training flags, one per `Configs` field; with `defaults=False`, only the flags given
    appear in the result."""
    parser = Parser(
        prog="ppo_breakout.py",
        description="PPO on an Atari game (default Breakout), reported to labml. "
        "Subcommands: 'evaluate CHECKPOINT', 'plot RUN_FOLDER', 'export CHECKPOINT OUT' and 'dashboard' "
        "(each with --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    groups = {
        ppo.Configs: parser.add_argument_group(
            "the algorithm's settings",
            "what the learning depends on: kept in each checkpoint, and taken from it on resume",
        ),
        ppo.RunSettings: parser.add_argument_group(
            "the run's settings",
            "what the machine does: taken from this command line every time, resumed or not",
        ),
    }
    for settings, group in groups.items():
        for field in dataclasses.fields(settings):
            if field.type is bool:
                kind = dict(action=argparse.BooleanOptionalAction)
            else:
                kind = dict(type=field.type, metavar=field.name.rstrip("_").upper())
            default = field.default if defaults else argparse.SUPPRESS
            help = field.metadata["help"]
            group.add_argument(flag_of(field.name), dest=field.name, default=default, help=help, **kind)
    run = groups[ppo.RunSettings]
    run.add_argument(
        "--dashboard",
        metavar="URL",
        default="auto" if defaults else argparse.SUPPRESS,
        help="labml dashboard to report to and take changes from: a URL, 'off', or 'auto' (the labml "
        "config's web_api, else http://127.0.0.1:5005 when something answers there)",
    )
    run.add_argument(
        "--resume",
        metavar="PATH",
        default=None if defaults else argparse.SUPPRESS,
        help="continue from a checkpoint file, or the newest checkpoint of a run folder; "
        "flags given here override the checkpoint's configuration",
    )
    return parser


def given_flags(argv: List[str]) -> dict:
    """The settings `argv` gives, and only those."""
    return vars(build_parser(defaults=False).parse_args(argv))


def resumed_configs(checkpoint: dict, argv: List[str]) -> "ppo.Configs":
    """A checkpoint's algorithm settings, with the flags `argv` gives overriding them. (A checkpoint
    written before the settings were split holds the run's settings too: they are not taken.)"""
    return ppo.settings_from(ppo.Configs, {**checkpoint["configs"], **given_flags(argv)})


class BadInput(SystemExit):
    """Bad input, already reported on stderr in one line: exit 2."""


def parse(
    argv: List[str], read_resume: bool = True
) -> Tuple["ppo.Configs", "ppo.RunSettings", Optional[dict], Optional[str], str]:
    """(configs, run settings, the checkpoint to resume from, the run's comment, the --dashboard
    flag); raises BadInput, having said why in one line, before anything starts. Without
    `read_resume` (a torchrun rank but rank 0) the --resume checkpoint is left to rank 0 to read."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    configs, run_settings = ppo.settings_from(ppo.Configs, args), ppo.settings_from(ppo.RunSettings, args)
    checkpoint, comment = None, None
    if args["resume"] and read_resume:
        try:
            checkpoint, comment = run_files.resume(args["resume"], given_flags(argv))
        except run_files.CheckpointError as e:
            raise BadInput(fail(parser.prog, str(e)))
        configs = resumed_configs(checkpoint, argv)
    errors = config_errors(configs, run_settings)
    problem = dashboard.dashboard_flag_problem(args["dashboard"])
    errors += [("dashboard", problem)] if problem else []
    for name, problem in errors[:-1]:
        print(f"{parser.prog}: error: argument {flag_of(name)}: {problem}", file=sys.stderr)
    if errors:
        parser.error(f"argument {flag_of(errors[-1][0])}: {errors[-1][1]}")
    return configs, run_settings, checkpoint, comment, args["dashboard"]


def config_errors(c: "ppo.Configs", r: "ppo.RunSettings") -> List[Tuple[str, str]]:
    """Every problem with `c` and `r`, as (setting, problem); empty when the configuration can run."""
    errors = []
    positive = [(name, getattr(c, name)) for name in ("updates", "epochs", "n_workers", "worker_steps", "batches")]
    positive += [(name, getattr(r, name)) for name in ("checkpoint_every", "keep_checkpoints")]
    for name, value in positive:
        if value <= 0:
            errors.append((name, f"must be a positive integer, got {value}"))
    problem = ppo.batches_problem(c)
    mini_batch_size = None if problem else c.n_workers * c.worker_steps // c.batches
    on_cpu = not device_problem(r.device) and ppo.parse_device(r.device).type == "cpu"
    if problem and not any(value <= 0 for _, value in positive):  # else said above: not positive
        errors.append(("batches", problem))
    elif not problem and mini_batch_size < 2:
        # each minibatch normalises its advantages by their standard deviation, which one sample lacks
        errors.append(("batches", f"minibatches of {mini_batch_size} sample: need 2 or more"))
    elif not problem and on_cpu and r.train_threads > mini_batch_size:  # a share of a minibatch holds a sample
        most = f"must be at most a minibatch's {mini_batch_size} samples"
        errors.append(("train_threads", f"{most}, got {r.train_threads}"))
    floats = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.type is float}
    errors += [(name, f"must be a finite number, got {v}") for name, v in floats.items() if not math.isfinite(v)]
    finite = [name for name, value in floats.items() if math.isfinite(value)]  # the checks of range
    weights = ("learning_rate", "value_loss_coef", "entropy_bonus_coef", "max_grad_norm")
    for name in [n for n in weights if n in finite]:
        if not getattr(c, name) >= 0:
            errors.append((name, f"must not be negative, got {getattr(c, name)}"))
    if "clip_range" in finite and not 0 < c.clip_range < 1:
        errors.append(("clip_range", f"must be in (0, 1), got {c.clip_range}"))
    for name in [n for n in ("gamma", "lambda_") if n in finite]:
        if not 0 <= getattr(c, name) <= 1:
            errors.append((name, f"must be in [0, 1], got {getattr(c, name)}"))
    if "sticky_actions" in finite and not 0 <= c.sticky_actions <= 1:
        errors.append(("sticky_actions", f"must be in [0, 1], got {c.sticky_actions}"))
    if "adam_eps" in finite and not c.adam_eps > 0:
        errors.append(("adam_eps", f"must be positive, got {c.adam_eps}"))
    try:
        if rom_path(c.game) is None:
            examples = "for example: breakout, pong, space_invaders"
            errors.append(("game", f"ale-py ships no ROM named {c.game!r} ({examples})"))
    except RomError as e:
        errors.append(("game", str(e)))
    choices_of = {
        "lr_schedule": (c.lr_schedule, ("constant", "linear")),
        "precision": (r.precision, ("auto", "fp32", "bf16")),
        "backend": (r.backend, ("auto", "gloo", "nccl")),
    }
    for name, (value, choices) in choices_of.items():
        if value not in choices:
            errors.append((name, f"must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"))
    if not (math.isfinite(r.worker_timeout) and r.worker_timeout > 0):
        errors.append(("worker_timeout", f"must be a positive number of seconds, got {r.worker_timeout}"))
    cpus = os.cpu_count() or 1
    if r.rollout_threads < 0:
        errors.append(("rollout_threads", f"must be 0 or more, got {r.rollout_threads}"))
    elif r.rollout_threads > cpus:  # threads beyond the CPUs only wait on each other
        errors.append(("rollout_threads", f"must be at most this machine's {cpus} CPUs, got {r.rollout_threads}"))
    if r.train_threads < 0:
        errors.append(("train_threads", f"must be 0 or more, got {r.train_threads}"))
    for name, problem in (("seed", seed_problem(c.seed)), ("device", device_problem(r.device))):
        if problem:
            errors.append((name, problem))
    return errors or memory_errors(c, r)


# What a run holds at its peak on the CPU, rounded up from bench.py's measurements (docs/speed.md):
# a base, each worker, each sample of the batch, each sample of a minibatch (activations, gradients)
MEMORY = dict(base=288 * 2**20, worker=32 * 2**20, sample=128 * 2**10, minibatch_sample=320 * 2**10)


def memory_errors(c: "ppo.Configs", r: "ppo.RunSettings") -> List[Tuple[str, str]]:
    """A run that cannot fit in this machine's memory is refused before it starts a worker."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return []  # not every platform says
    samples, have = c.n_workers * c.worker_steps, f"more than this machine's {total / 2**30:.1f} GiB"
    workers = MEMORY["base"] + c.n_workers * MEMORY["worker"]
    needed, minibatches = workers + samples * MEMORY["sample"], ""
    if ppo.parse_device(r.device).type == "cpu":
        needed += samples // c.batches * MEMORY["minibatch_sample"]
        minibatches = f" in minibatches of {samples // c.batches}"
    if workers > total:
        return [("n_workers", f"{c.n_workers} worker processes need about {workers / 2**30:,.1f} GiB, {have}")]
    if needed > total:
        need = f"need about {needed / 2**30:,.1f} GiB of memory, {have}"
        return [("worker_steps", f"{c.n_workers} workers x {c.worker_steps} steps{minibatches} {need}")]
    return []


class StopRequested(Exception):
    """A second Ctrl-C, SIGTERM or SIGHUP: stop now, without waiting for the update to end."""


def stop_signals() -> List[int]:
    """Ctrl-C, SIGTERM, and a terminal's hang-up unless the run was started under `nohup`."""
    ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    return [signal.SIGINT, signal.SIGTERM] + ([] if ignored else [signal.SIGHUP])


def terminal_leaver() -> Callable[[], None]:
    """A function that points stdin, stdout and stderr, those that are the terminal now, at
    /dev/null: after a hang-up every write to the terminal fails, and the run still has its update
    and checkpoint to write."""
    fds = [fd for fd in (0, 1, 2) if os.isatty(fd)]

    def leave_terminal():
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in fds:
            os.dup2(devnull, fd)
        os.close(devnull)

    return leave_terminal


@contextlib.contextmanager
def stop_handlers(trainer: "ppo.Trainer", again_stops: bool = True):
    """Inside, the first stop signal asks the trainer to stop after this update, and a second one
    stops at once (unless not `again_stops`: torchrun passes its own signal on to its ranks); the
    handlers before are back after, for the next run in the same process (a notebook's)."""
    leave_terminal = terminal_leaver()

    def handler(signum, frame):
        if signum == signal.SIGHUP:
            leave_terminal()
        if trainer.stop_requested:
            if again_stops:
                raise StopRequested(signum)
            return
        trainer.stop_requested = signum
        name = signal.Signals(signum).name
        then = "again to stop at once" if again_stops else "if every rank finishes it too"
        print(f"\n{name}: stopping after this update with a checkpoint ({then})", file=sys.stderr)

    before = {signum: signal.signal(signum, handler) for signum in stop_signals()}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def exit_code(error: BaseException, run: Optional["run_files.RunFolder"], partner: "ppo.OneProcess") -> int:
    """Say in one line why a run ended early and what it saved; its exit status. Under torchrun
    (`partner`), the line names the rank, and rank 0 alone has a run folder to speak of."""
    saved = run.left_behind() if run is not None else "rank 0 keeps the run folder"
    if isinstance(error, (KeyboardInterrupt, StopRequested)):
        print(f"\nStopped at once; {saved}", file=sys.stderr)
        return 128 + (error.args[0] if isinstance(error, StopRequested) else signal.SIGINT)
    if isinstance(error, (ppo.WorkerError, ppo.Diverged)):
        # the update under way is lost with the worker; a diverged one is kept nowhere
        lost = "nothing of it was kept" if isinstance(error, ppo.Diverged) else "the update in progress is lost"
        rank = f"rank {partner.rank}: " if partner.torchrun else ""
        print(f"\nerror: {rank}{error}; {lost}; {saved}", file=sys.stderr)
        return 1
    # a full disk, for one: what was written before stays
    reason = error
    if not isinstance(error, run_files.RunFileError):
        reason = f"cannot write the run: {run_files.os_reason(error)}"
    print(f"error: {reason}; {saved}", file=sys.stderr)
    return 1


class Progress:
    """The run's progress in one short line, for a person: update k of N, env steps, the 100-game
    score, env steps/s and the time left. On a terminal the line is rewritten in place after every
    update; into a file or a notebook a new line is written at the first update, then every
    `every_s` seconds and at the last. The full metrics go to labml and metrics.jsonl."""

    def __init__(self, stream=sys.stdout, every_s: float = 60.0):
        self.stream, self.every_s = stream, every_s
        self.terminal = stream.isatty()
        self.start, self.first_update, self.last_line = time.monotonic(), None, None

    def line(self, trainer: "ppo.Trainer", stats: Dict[str, float]) -> str:
        if self.first_update is None:
            self.first_update = trainer.update - 1
        done, left = trainer.update - self.first_update, trainer.updates - trainer.update
        eta = duration((time.monotonic() - self.start) / done * left)
        score = f"score {stats['reward']:.2f}" if "reward" in stats else "no game ended yet"
        return (
            f"update {trainer.update:,} of {trainer.updates:,}  {trainer.env_steps:,} env steps  {score}  "
            f"{stats['steps_per_second']:,.0f} env steps/s  {eta} left"
        )

    def show(self, trainer: "ppo.Trainer", stats: Dict[str, float], last: bool):
        line, now = self.line(trainer, stats), time.monotonic()
        if self.terminal:
            self.stream.write(f"\r{line}\033[K")  # \033[K: clear what a longer line left
        elif self.last_line is None or last or now - self.last_line >= self.every_s:
            self.stream.write(line + "\n")
            self.last_line = now
        self.stream.flush()


def duration(seconds: float) -> str:
    """`seconds` for a person: "2 h 05 min", "4 min 10 s", "12 s"."""
    seconds = round(seconds)
    hours, minutes = seconds // 3600, seconds % 3600 // 60
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds % 60:02d} s" if minutes else f"{seconds} s"


def train(
    configs: "ppo.Configs",
    run_settings: Optional["ppo.RunSettings"] = None,
    checkpoint: Optional[dict] = None,
    comment: Optional[str] = None,
    dashboard_flag: str = "off",
    partner=None,
    rank_seed: Optional[int] = None,
    given: Tuple[str, ...] = (),
) -> int:
    """Train, reporting to labml; its exit status. Under torchrun (`partner`, the job's
    `distributed.Ranks`), rank 0 alone reports and keeps the run folder, and each rank draws its
    actions from a stream seeded by `rank_seed`. `given`: the settings the command line gave, which
    labml records as explicitly specified (the dashboard lists them apart from the defaults)."""
    run_settings = run_settings or ppo.RunSettings()
    partner = partner or ppo.OneProcess()
    lead = partner.rank == 0
    url = dashboard.connect(dashboard_flag) if lead else None
    if lead:
        # labml's screen writer would print every metric: Progress prints the few a person reads
        writers = {"sqlite"} | ({"web_api"} if url else set())
        experiment.create(name="ppo_breakout", comment=comment, writers=writers)
    run = run_files.RunFolder(run_settings, checkpoint, partner) if lead else None
    progress = Progress() if lead else None
    trainer = None

    def after_update(stats: Dict[str, float], last: bool):
        if progress is not None:
            progress.show(trainer, stats, last)
        # the metrics every update; every rank's part of a checkpoint when one is due, gathered to rank 0
        due = trainer.update % run_settings.checkpoint_every == 0 or last
        ranks = partner.gather(run_files.rank_state(trainer)) if due else None
        if run is not None and run.keep(trainer, stats, ranks):
            plots.refresh_curve(run.path)

    try:
        first_update = checkpoint["update"] if checkpoint is not None else 0
        trainer = ppo.Trainer(configs, run_settings, partner, first_update)
        resumed_games = checkpoint is not None and run_files.restore(trainer, checkpoint)
        changes = run_files.run_settings_changes(checkpoint, trainer) if checkpoint is not None else []
        if changes and lead:  # the run's settings are this command line's: say where they differ
            print(f"Run settings that differ from the run this continues: {'; '.join(changes)}")
        if rank_seed is not None and not resumed_games:  # a resumed rank has its own random state
            torch.manual_seed(rank_seed)
        if lead:
            settings = {**dataclasses.asdict(configs), **dataclasses.asdict(run_settings), **trainer.hyperparams}
            settings["resumed_from"] = comment or ""
            # labml prints the comment, the run a resumed one continues, under the run's name; the
            # settings given on the command line are recorded as specified, the rest as defaults
            experiment.configs(settings, {name: settings[name] for name in given if name in settings})
        with (
            # torchrun passes its own second signal on to its ranks: theirs does not stop at once
            stop_handlers(trainer, again_stops=not partner.torchrun),
            experiment.start() if lead else contextlib.nullcontext(),
        ):
            if url:
                dashboard.claim_run(url, experiment.get_uuid())
            if lead:
                print(f"Run folder: {run.path}", flush=True)
            trainer.run_training_loop(after_update)
    except (KeyboardInterrupt, StopRequested, ppo.WorkerError, ppo.Diverged, run_files.RunFileError, OSError) as e:
        return exit_code(e, run, partner)
    finally:
        if trainer is not None:
            trainer.destroy()
    if lead and progress.terminal:
        print(flush=True)  # end the progress line, so the next stands on its own
    if trainer.stop_requested and lead:
        print(f"Stopped at update {trainer.update}; checkpoint and metrics are in {run.path}", file=sys.stderr)
    elif lead:
        scores = trainer.episode_rewards
        score = f"score {sum(scores) / len(scores):.2f} (the last {len(scores)} games)" if scores else "no game ended"
        print(
            f"Finished: {trainer.update:,} updates, {trainer.env_steps:,} env steps, {score}; "
            f"last checkpoint {run.newest_checkpoint()}; run folder {run.path}"
        )
    return 128 + trainer.stop_requested if trainer.stop_requested else 0
