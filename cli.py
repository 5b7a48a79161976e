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
import os
import signal
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from labml import experiment

import dashboard
import evaluate
import plots
import ppo_breakout as ppo
import run_files
from errors import Parser, device_problem, fail, seed_problem
from game import rom_path

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


def parse(argv: List[str]) -> Tuple["ppo.Configs", "ppo.RunSettings", Optional[dict], Optional[str], str]:
    """(configs, run settings, the checkpoint to resume from, the run's comment, the --dashboard
    flag); raises BadInput, having said why in one line, before anything starts."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    configs, run_settings = ppo.settings_from(ppo.Configs, args), ppo.settings_from(ppo.RunSettings, args)
    checkpoint, comment = None, None
    if args["resume"]:
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
    if problem and not any(value <= 0 for _, value in positive):  # else said above: not positive
        errors.append(("batches", problem))
    for name in ("learning_rate", "value_loss_coef", "entropy_bonus_coef", "max_grad_norm"):
        if not getattr(c, name) >= 0:
            errors.append((name, f"must not be negative, got {getattr(c, name)}"))
    if not 0 < c.clip_range < 1:
        errors.append(("clip_range", f"must be in (0, 1), got {c.clip_range}"))
    for name in ("gamma", "lambda_"):
        if not 0 <= getattr(c, name) <= 1:
            errors.append((name, f"must be in [0, 1], got {getattr(c, name)}"))
    if not c.adam_eps > 0:
        errors.append(("adam_eps", f"must be positive, got {c.adam_eps}"))
    if rom_path(c.game) is None:
        errors.append(("game", f"ale-py ships no ROM named {c.game!r} (for example: breakout, pong, space_invaders)"))
    choices_of = {
        "lr_schedule": (c.lr_schedule, ("constant", "linear")),
        "precision": (r.precision, ("auto", "fp32", "bf16")),
        "backend": (r.backend, ("auto", "gloo", "nccl")),
    }
    for name, (value, choices) in choices_of.items():
        if value not in choices:
            errors.append((name, f"must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"))
    cpus = os.cpu_count() or 1
    if r.rollout_threads < 0:
        errors.append(("rollout_threads", f"must be 0 or more, got {r.rollout_threads}"))
    elif r.rollout_threads > cpus:  # threads beyond the CPUs only wait on each other
        errors.append(("rollout_threads", f"must be at most this machine's {cpus} CPUs, got {r.rollout_threads}"))
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
    if isinstance(error, ppo.WorkerError):
        print(f"error: {f'rank {partner.rank}: ' if partner.torchrun else ''}{error}", file=sys.stderr)
        return 1
    # a full disk, for one: what was written before stays
    reason = error
    if not isinstance(error, run_files.RunFileError):
        reason = f"cannot write the run: {run_files.os_reason(error)}"
    print(f"error: {reason}; {saved}", file=sys.stderr)
    return 1


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
        writers = {"screen", "sqlite"} | ({"web_api"} if url else set())
        experiment.create(name="ppo_breakout", comment=comment, writers=writers)
    run = run_files.RunFolder(run_settings, checkpoint, partner) if lead else None
    trainer = None

    def after_update(stats: Dict[str, float], last: bool):
        # the metrics every update; every rank's part of a checkpoint when one is due, gathered to rank 0
        due = trainer.update % run_settings.checkpoint_every == 0 or last
        ranks = partner.gather(run_files.rank_state(trainer)) if due else None
        if run is not None and run.keep(trainer, stats, ranks):
            plots.refresh_curve(run.path)

    try:
        first_update = checkpoint["update"] if checkpoint is not None else 0
        trainer = ppo.Trainer(configs, run_settings, partner, first_update)
        resumed_games = checkpoint is not None and run_files.restore(trainer, checkpoint)
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
            trainer.run_training_loop(after_update)
    except (KeyboardInterrupt, StopRequested, ppo.WorkerError, run_files.RunFileError, OSError) as e:
        return exit_code(e, run, partner)
    finally:
        if trainer is not None:
            trainer.destroy()
    if trainer.stop_requested and lead:
        print(flush=True)  # end labml's progress line, so this one stands on its own
        print(f"Stopped at update {trainer.update}; checkpoint and metrics are in {run.path}", file=sys.stderr)
    return 128 + trainer.stop_requested if trainer.stop_requested else 0
