"""
The files of a run folder (logs/ppo_breakout/<run uuid>/, made by labml): `metrics.jsonl`, one
JSON line an update, the record that needs no server; and `checkpoints/update_NNNNNNN.pt`, written
atomically, the newest few kept: the trainer's whole state (`trainer_state`), from which `restore`
goes on exactly. `python ppo_breakout.py --resume` and `evaluate` read them here.

A trained policy leaves its run as a file of its own (models/breakout_10m.pt is one):

    python ppo_breakout.py export logs/ppo_breakout/<run> models/breakout_10m.pt

keeps the weights and the settings needed to play them, without Adam's state, the games in progress
or the random state: a few MB that `evaluate` and the notebook play, and that cannot be resumed.
"""

import contextlib
import copy
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from labml import lab
from labml.internal.experiment import experiment_singleton

import ppo_breakout as ppo
from errors import Parser, fail
from game import RomError, minimal_actions, rom_path

CHECKPOINT_FORMAT = 1  # bumped when the checkpoint's contents change
POLICY_FORMAT = 1  # the same for an exported policy (export_policy)


class RunFileError(Exception):
    """A file of a run (checkpoint, metrics, video) that is missing, unreadable or cannot be written; one line."""


class CheckpointError(RunFileError):
    """A checkpoint that is missing, unreadable or does not fit."""


def write_metrics(run: Path, trainer: "ppo.Trainer", stats: Dict[str, float]):
    """Append the update's statistics and the games that ended in it to `metrics.jsonl`."""
    record = {
        "update": trainer.update,
        "env_steps": trainer.env_steps,
        "time": time.time(),
        **stats,
        "games": [[g["reward"], g["length"]] for g in trainer.games],
    }
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def os_reason(e: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"), wherever in
    the chain of exceptions they are."""
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = e.__cause__ or e.__context__
    return "unknown error"


def atomic_save(state: dict, path: Path):
    """Write to a temporary file, flush it to disk, then rename: a kill at any moment leaves
    either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)  # the rename itself survives a power cut only once its folder is on disk
    except (OSError, RuntimeError) as e:  # torch.save turns a full disk into a RuntimeError
        tmp.unlink(missing_ok=True)  # a partial file would only fill the disk further
        raise RunFileError(f"cannot write {path}: {os_reason(e)}") from e
    except BaseException:  # a second Ctrl-C while torch.save writes: no half file left behind
        tmp.unlink(missing_ok=True)
        raise


def sync_folder(folder: Path):
    """Flush a folder's entries (a rename in it) to disk, where the platform can."""
    with contextlib.suppress(OSError):  # not every platform opens folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def update_of(checkpoint: Path) -> int:
    """The update a checkpoint file's name `update_NNNNNNN.pt` holds (more digits past 9,999,999)."""
    return int(checkpoint.stem.removeprefix("update_"))


def by_update(checkpoints) -> List[Path]:
    """Checkpoint files, oldest update first: by number, since names sort wrong past 7 digits."""
    return sorted(checkpoints, key=update_of)


# ## The trainer's state: what a checkpoint holds


def cuda_rng_state(device: torch.device) -> torch.Tensor:
    """The random state of `device`'s own CUDA generator, or an empty tensor on the CPU: only the
    trainer's own, so a checkpoint written where 8 GPUs are visible resumes where there is one."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)


def set_cuda_rng_state(state, device: torch.device):
    """Restore `cuda_rng_state()` on `device`; nothing on the CPU or from a CPU checkpoint."""
    if isinstance(state, list):  # checkpoints before: every visible GPU's; the trainer's was the first
        state = state[0] if state else torch.zeros(0, dtype=torch.uint8)
    if device.type == "cuda" and state.numel():
        torch.cuda.set_rng_state(state, device)


def rank_state(trainer: "ppo.Trainer") -> dict:
    """This process's part of a checkpoint: its games in progress (`Game.get_state()`, arrays as
    tensors), its latest observations and its random state."""
    for worker in trainer.workers:
        worker.send(ppo.Command.GET_STATE)
    games = [worker.receive() for worker in trainer.workers]
    as_tensors = [{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in g.items()} for g in games]
    return {
        "games": as_tensors,
        "obs": torch.from_numpy(trainer.obs.copy()),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": cuda_rng_state(trainer.device),
    }


def trainer_state(trainer: "ppo.Trainer", ranks: Optional[List[dict]] = None) -> dict:
    """Everything needed to go on exactly: the weights, Adam's state, the counters, the dynamic
    hyperparameters' current values, every rank's games in progress and random state (`ranks`,
    every rank's `rank_state()` gathered at a checkpoint; by default this process's alone). Plain
    types and tensors only, so `torch.load(weights_only=True)` reads it without running code."""
    ranks = ranks if ranks is not None else [rank_state(trainer)]
    configs = dataclasses.asdict(trainer.configs)
    configs.update({name: hyperparam() for name, hyperparam in trainer.hyperparams.items()})
    optimizer = trainer.optimizer.state_dict()
    for group in optimizer["param_groups"]:
        # a float, not the CUDA graph's device tensor, so the checkpoint loads on any device
        group.update(lr=float(group["lr"]), capturable=False)
    return {
        "configs": configs,
        "run_settings": effective_run_settings(trainer),  # recorded, never applied: a resume takes its own
        "n_actions": trainer.model.pi_logits.out_features,
        "model": trainer.model.state_dict(),
        "optimizer": optimizer,
        "update": trainer.update,
        "env_steps": trainer.env_steps,
        "optimizer_steps": trainer.optimizer_steps,
        "episode_rewards": list(trainer.episode_rewards),
        "episode_lengths": list(trainer.episode_lengths),
        "torch_rng": ranks[0]["torch_rng"],
        "cuda_rng": ranks[0]["cuda_rng"],
        "ranks": ranks,
    }


def effective_run_settings(trainer: "ppo.Trainer") -> dict:
    """The trainer's run settings as they took effect: the device and precision that `auto`
    resolved to, CUDA graphs only where they ran."""
    precision = "bf16" if trainer.autocast_dtype == torch.bfloat16 else "fp32"
    effective = dict(device=str(trainer.device), precision=precision, cuda_graphs=trainer.graphs)
    effective.update(train_threads=trainer.backward.shares)  # 0 resolved; a GPU computes 1 share
    return {**dataclasses.asdict(trainer.run_settings), **effective}


def run_settings_changes(state: dict, trainer: "ppo.Trainer") -> List[str]:
    """The run settings in effect now that differ from those of the run `state` continues, such as
    "precision: fp32 in the run, bf16 now", or that its version did not keep yet (none for a
    checkpoint written before any were kept)."""
    before, now = state.get("run_settings", {}), effective_run_settings(trainer)
    changed = [name for name in now if name in before and before[name] != now[name]]
    lines = [f"{name}: {before[name]} in the run, {now[name]} now" for name in changed]
    if before:
        lines += [f"{name}: not kept by the run's version, {now[name]} now" for name in now if name not in before]
    return lines


def restore(trainer: "ppo.Trainer", state: dict) -> bool:
    """Go on from `state` (`trainer_state()`'s) in a new trainer started at its update: the weights,
    Adam's state, the counters, the last 100 games and the random state; then this rank's games in
    progress and random state, where the checkpoint has games that fit this run (else one line says
    why, and the trainer's new games go on). True if the games resumed."""
    state = copy.deepcopy(state)  # Adam adopts the tensors it is given: training must not alter `state`
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.update, trainer.env_steps = state["update"], state["env_steps"]
    trainer.optimizer_steps = state["optimizer_steps"]
    trainer.episode_rewards.extend(state["episode_rewards"])
    trainer.episode_lengths.extend(state["episode_lengths"])
    torch.set_rng_state(state["torch_rng"])
    set_cuda_rng_state(state["cuda_rng"], trainer.device)

    ranks, world, game = state.get("ranks"), trainer.partner.world_size, state["configs"]["game"]
    if game != trainer.configs.game:
        why = f"they are games of {game}, this run plays {trainer.configs.game}"
    elif ranks is None:
        why = "it holds none (it was written before games were saved)"
    elif len(ranks) != world or any(len(r["games"]) != trainer.n_workers for r in ranks):
        saved = f"{len(ranks)} rank(s) x {len(ranks[0]['games'])} workers"
        why = f"its games are {saved}, this run's {world} x {trainer.n_workers}"
    else:
        why = None
    if why is not None:
        print(f"Starting new games, not the checkpoint's: {why}")
        return False
    mine = ranks[trainer.partner.rank]
    for worker, saved in zip(trainer.workers, mine["games"]):
        as_arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
        worker.send(ppo.Command.SET_STATE, as_arrays)
    for i, worker in enumerate(trainer.workers):
        worker.receive()
        trainer.obs[i] = worker.obs
    torch.set_rng_state(mine["torch_rng"])
    set_cuda_rng_state(mine["cuda_rng"], trainer.device)
    return True


# ## The run folder's files


def save_checkpoint(trainer: "ppo.Trainer", run: Path, keep: int, ranks: Optional[List[dict]] = None) -> Optional[Path]:
    """Write `checkpoints/update_NNNNNNN.pt` in the run folder (with every rank's games, `ranks`);
    keep the newest `keep`."""
    if trainer.update == 0:
        return None
    folder = run / "checkpoints"
    folder.mkdir(exist_ok=True)
    path = folder / f"update_{trainer.update:07d}.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, **trainer_state(trainer, ranks)}, path)
    for old in by_update(folder.glob("update_*.pt"))[:-keep]:
        old.unlink()
    return path


def find_checkpoint(path: Path) -> Path:
    """`path` itself, or the newest checkpoint of the run folder `path`."""
    if path.is_dir():
        found = by_update(path.glob("checkpoints/update_*.pt")) or by_update(path.glob("update_*.pt"))
        if not found:
            raise CheckpointError(f"no checkpoint in {path}")
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to: the one above its checkpoints/ folder, or the
    folder it lies in."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_checkpoint(path, game: Optional[str] = None, data: Optional[bytes] = None) -> Tuple[Path, dict]:
    """Read a checkpoint (file or run folder); with `game`, check its policy fits that game. With
    `data`, the bytes of the checkpoint file `path` (read on another machine) are read instead.
    The state returned holds the file's path too, under "path"."""
    path = find_checkpoint(Path(path)) if data is None else Path(path)
    try:
        state = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint ({type(e).__name__})")
    is_policy = isinstance(state, dict) and state.get("policy_format") == POLICY_FORMAT
    if not is_policy and (not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"{path} is not a ppo_breakout checkpoint (format {CHECKPOINT_FORMAT}) or policy (format {POLICY_FORMAT})"
        )
    game = game or state["configs"]["game"]
    try:
        if rom_path(game) is None:
            raise CheckpointError(f"ale-py ships no ROM named {game!r}")
    except RomError as e:
        raise CheckpointError(str(e)) from None
    if not all(bool(torch.isfinite(w).all()) for w in state.get("model", {}).values() if w.is_floating_point()):
        raise CheckpointError(f"{path} holds weights that are not finite numbers: its run had diverged")
    n_actions = len(minimal_actions(game))
    if state["n_actions"] != n_actions:
        raise CheckpointError(
            f"checkpoint {path} has a policy with {state['n_actions']} actions, but {game} has {n_actions}"
        )
    state["path"], state["policy_only"] = str(path), is_policy
    return path, state


def export_policy(checkpoint, out: Path) -> dict:
    """Write the policy of `checkpoint` (a file, or a run folder's newest) to `out`, atomically: the
    weights (float32, as trained: autocast computes in bf16 but keeps the weights in float32), the
    settings, and where they came from: the update, the env steps and the last 100 games' scores at
    that update. Returns what it wrote."""
    path, state = load_checkpoint(checkpoint)
    path = path.resolve()  # a relative path from inside checkpoints/ still names its run
    if state["policy_only"]:
        raise CheckpointError(f"{path} is a policy already")
    policy = {
        "policy_format": POLICY_FORMAT,
        "model": state["model"],
        "n_actions": state["n_actions"],
        "configs": state["configs"],
        "update": state["update"],
        "env_steps": state["env_steps"],
        "episode_rewards": state["episode_rewards"],
        "from_checkpoint": str(path.relative_to(run_folder_of(path).parent)),
    }
    atomic_save(policy, out)
    return policy


JOB_FILE = "torchrun_job"  # in a run folder a torchrun job made: the job's name (distributed.Ranks.job)


def job_checkpoint(job: str) -> Optional[str]:
    """The newest checkpoint of the torchrun job `job` (over all the run folders it made), or None."""
    runs = [
        f.parent for f in Path(lab.get_experiments_path()).glob(f"ppo_breakout/*/{JOB_FILE}") if f.read_text() == job
    ]
    found = by_update(c for run in runs for c in run.glob("checkpoints/update_*.pt"))
    return str(found[-1]) if found else None


def resume(path, explicit: dict) -> Tuple[dict, str]:
    """The checkpoint to go on from, and the run's comment; `explicit` holds the flags given."""
    try:
        path, checkpoint = load_checkpoint(path, game=explicit.get("game"))
    except CheckpointError as e:
        raise CheckpointError(f"argument --resume: {e}") from None
    if checkpoint["policy_only"]:
        raise CheckpointError(
            f"argument --resume: {path} is an exported policy (weights and settings, no optimizer state or games): "
            "evaluate plays it, training goes on only from a run's checkpoint"
        )
    metrics_problem(path, checkpoint["update"])
    updates = explicit.get("updates", checkpoint["configs"]["updates"])
    if updates <= checkpoint["update"]:
        raise CheckpointError(
            f"argument --updates: {updates} is not beyond the checkpoint's update {checkpoint['update']} ({path}); "
            "--updates counts all updates, so give more to train on"
        )
    where = f"run {run_folder_of(path).name}" if path.parent.name == "checkpoints" else "a checkpoint file"
    return checkpoint, f"continues {where} from update {checkpoint['update']} ({path})"


def metrics_history(source: Path, update: int) -> Tuple[List[str], Optional[int]]:
    """The lines of a run's metrics.jsonl up to `update`, and the number of a cut last line left
    out (a run killed while writing it), or None. Raises RunFileError naming any other line that
    is not an update's record."""
    lines, cut = [], None
    text = source.read_text().splitlines(keepends=True)
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kept = record["update"] <= update
        except (ValueError, KeyError, TypeError):
            if number == len(text) and not line.endswith("\n"):
                cut = number
                continue
            raise RunFileError(f"{source} line {number} is not an update's record: {line.strip()[:60]!r}") from None
        if kept:
            lines.append(line if line.endswith("\n") else line + "\n")
    return lines, cut


def metrics_problem(checkpoint: Path, update: int):
    """Refuse, before a resume starts, metrics that the resumed run could not continue."""
    source = run_folder_of(checkpoint) / "metrics.jsonl"
    if source.exists():
        try:
            metrics_history(source, update)
        except RunFileError as e:
            raise CheckpointError(f"argument --resume: {e}") from None


class RunFolder:
    """The folder labml made for the current run. A run that goes on from a checkpoint (`checkpoint`,
    as `load_checkpoint` read it) begins its metrics with those of the run it continues, up to the
    checkpoint's update, so its metrics.jsonl and curve.png show the whole run from update 1."""

    def __init__(self, run_settings: "ppo.RunSettings", checkpoint: Optional[dict] = None, partner=None):
        run = experiment_singleton().run
        self.path = Path(run.run_path)
        self.run_settings, self.resumed = run_settings, checkpoint is not None
        self.job = partner.job if partner else None  # torchrun's: its restarts go on from this folder
        if partner is not None and partner.torchrun:
            # for run.yaml; told at experiment.create, labml would name the folder <uuid>.<rank>
            run.distributed_world_size = partner.world_size
        self.updates_kept = 0  # by this run, not the history it continues
        # the history is copied when the first update is kept: labml makes the folder at the start
        self.continues = (Path(checkpoint["path"]), checkpoint["update"]) if checkpoint is not None else None

    def continue_metrics(self, checkpoint: Path, update: int):
        """Copy the lines up to `update` of the metrics of the run `checkpoint` belongs to (the
        run folder above its checkpoints/ folder), or say in one line that there are none."""
        folder = run_folder_of(checkpoint)
        if not (folder / "metrics.jsonl").exists():
            print(f"No metrics.jsonl in {folder}: this run's metrics begin after update {update}")
            return
        lines, cut = metrics_history(folder / "metrics.jsonl", update)
        if cut:
            print(f"Dropped the cut last line of {folder / 'metrics.jsonl'} (line {cut}): a run ended while writing it")
        with open(self.path / "metrics.jsonl", "w") as history:
            history.writelines(lines)

    def keep(self, trainer: "ppo.Trainer", stats: Dict[str, float], ranks: Optional[List[dict]] = None) -> bool:
        """Write the update's metrics and, where every rank's part of a checkpoint is given
        (`ranks`: every `checkpoint_every` updates, and at the end however the run ends), the
        checkpoint; True when it wrote one."""
        if self.continues is not None and not self.updates_kept:
            self.continue_metrics(*self.continues)
        write_metrics(self.path, trainer, stats)
        self.updates_kept += 1
        if self.job is not None and not (self.path / JOB_FILE).exists():
            (self.path / JOB_FILE).write_text(self.job)
        if ranks is not None:
            save_checkpoint(trainer, self.path, self.run_settings.keep_checkpoints, ranks)
            return True
        return False

    def newest_checkpoint(self) -> Optional[Path]:
        checkpoints = by_update((self.path / "checkpoints").glob("update_*.pt"))
        return checkpoints[-1] if checkpoints else None

    def left_behind(self) -> str:
        """What a run that stopped at once or failed has saved, said as it is."""
        kept = f"; the checkpoint it resumed from stays: {self.continues[0]}" if self.resumed else ""
        if not self.updates_kept:
            return f"no update had finished, so nothing was saved{kept}"
        newest = self.newest_checkpoint()
        if newest is None:
            every = f"one every {self.run_settings.checkpoint_every} updates"
            return f"no checkpoint yet ({every}); the metrics are in {self.path}{kept}"
        return f"the last checkpoint is {newest}; the metrics are in {self.path}"


def main(argv: Optional[List[str]] = None) -> int:
    """`python ppo_breakout.py export CHECKPOINT OUT`: see export_policy."""
    parser = Parser(
        prog="ppo_breakout.py export",
        description="Write a checkpoint's policy (weights and settings, no optimizer state or games) to its own "
        "file, which evaluate and the notebook play.",
    )
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its newest checkpoint)")
    parser.add_argument("out", type=Path, help="the policy file to write, such as logs/my_agent.pt (folders made)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".pt":
        return fail(parser.prog, f"argument out: {args.out} must end in .pt")
    try:
        args.out.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(parser.prog, f"argument out: cannot make folder {args.out.parent}: {os_reason(e)}")
    try:
        policy = export_policy(args.checkpoint, args.out)
    except CheckpointError as e:
        return fail(parser.prog, str(e))
    except RunFileError as e:  # the file could not be written
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    scores = policy["episode_rewards"]
    mean = f"{sum(scores) / len(scores):.2f} over the last {len(scores)} games" if scores else "no games yet"
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB): the policy of {policy['from_checkpoint']}, "
        f"update {policy['update']:,}, {policy['env_steps']:,} env steps, training score {mean}"
    )
    return 0
