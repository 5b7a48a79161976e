"""
The same experiment under torchrun: N processes (ranks) train one policy.

    torchrun --standalone --nproc_per_node=2 ppo_breakout.py [flags]          # 2 ranks on this machine
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=JOB ppo_breakout.py [flags]                                   # on each of 2 machines
    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=4 --rdzv-backend=c10d \\
        --rdzv-endpoint=$(hostname):29500 --rdzv-id=$SLURM_JOB_ID ppo_breakout.py [flags]   # SLURM

`python ppo_breakout.py` hands a process that torchrun started to `main` here. What the ranks share, through
`Ranks`, the Trainer's partner here (a single process has `ppo_breakout.OneProcess`, whose exchanges
do nothing):

- Games: each rank runs its own `--n-workers` game processes. Their seeds come from the one
  SeedSequence, so the job's games are those of a single process with N x n_workers workers, and
  an update samples N x n_workers x worker_steps steps. The games that ended on every rank count
  in the reported 100-game mean.
- Gradients: each rank computes the loss on its share of every minibatch (batch_size / batches of
  its own samples) and the ranks average their gradients with one flat all-reduce, as CleanRL's
  ppo_atari_multigpu.py does; the advantages are normalised with the whole minibatch's mean and
  standard deviation. So every rank takes the Adam step a single process would take on the union
  of the ranks' shares, and the weights stay identical. What differs from one process with all
  the samples: a minibatch holds the same number of samples from every rank's games (one process
  would shuffle them all together), and each rank draws its actions from a random stream of its own.
- Dynamic hyperparameters: rank 0's values (where the dashboard writes them), taken at the start
  of each update and held by every rank for the whole update.
- Reporting: rank 0 alone creates the labml experiment, prints the progress and keeps the run
  folder; the losses, KL and clip fraction it reports are averaged over the ranks, the games are
  everyone's; explained variance and the update's timing are rank 0's own.
- Stopping: a stop signal on any rank ends the update on every rank (they agree after each
  update), with one checkpoint, written by rank 0. torchrun passes a signal it receives on to every
  rank: a rank acts on the first, and torchrun kills what has not ended after its shutdown timeout.
- Faults: every collective times out after COLLECTIVE_TIMEOUT_S. A rank that fails on its own (a
  game worker died, CUDA out of memory, a checkpoint it cannot read) ends with a line naming
  itself and what failed; the others, whose next exchange with it fails (`LostRanks`), end saying
  they lost it, rank 0 adding which checkpoint the job keeps (the update under way is lost with
  the rank). torchrun then sends SIGTERM to what is left, which a rank whose training has ended
  ignores until it has said so (torchrun kills it after its shutdown timeout if it does not end).
- Restarts: under `torchrun --max-restarts K` a restarted job goes on from the newest checkpoint
  of its own job, with that checkpoint's configuration (the dashboard's last values among them);
  the run's settings are the command line's, as on any resume. Rank 0 finds the checkpoint in its
  logs/ and sends its bytes to the others, so only rank 0's machine needs it (a restart that puts
  rank 0 on another machine needs logs/ on storage both see). Each run folder a job makes holds
  the job's name (`job_name`), so a new job never takes another's checkpoints; where each attempt
  has a rendezvous store of its own (etcd), the name is the job's --rdzv-id: give each job its own.
  A `--resume PATH` checkpoint is read the same way, by rank 0 alone from its own disk.
- Devices: gloo on the CPU, nccl on CUDA (gloo carries the small exchanges either way). Rank r
  uses cuda:LOCAL_RANK, or the GPU `--device-ids` names for it: `--device-ids 0,0` puts 2 ranks on
  one GPU, and then the gradients go over gloo too (on every machine: one communicator, one
  backend), since NCCL refuses two ranks of one job on one GPU; `--backend nccl` there is refused
  before any game starts (`backend_for`). CUDA graphs are off under torchrun: the gradients'
  all-reduce sits inside the step.
"""

import contextlib
import dataclasses
import io
import os
import re
import signal
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

import cli
import ppo_breakout as ppo
import run_files

COLLECTIVE_TIMEOUT_S = 60  # a rank that waits longer than this on the others gives up: the job ends
JOB_KEY = "ppo_breakout/job"  # in torchrun's store: the job's name, for the attempts after the first


class LostRanks(Exception):
    """An exchange with the other ranks failed: one of them is gone, or has not answered within
    COLLECTIVE_TIMEOUT_S. Its one line is the collective's own."""


@contextlib.contextmanager
def exchanging():
    """Inside, a failed collective raises LostRanks; this rank's own failures (out of memory while
    the collective allocates its buffers, say) stay as they are."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:  # gloo's and nccl's failures (DistError and its kinds are RuntimeErrors)
        # gloo's first line: "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:60108. This is typically..."
        raise LostRanks(re.sub(r"^\[[^\]]*\] ", "", first_line(e)).split(". ")[0]) from e


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def job_name(store: dist.Store, rank: int) -> str:
    """The job's name, which every run folder it makes records (run_files.JOB_FILE), so that its
    restarts find their checkpoints and a new job finds none. Where torchrun's store lives as long
    as the job (TORCHELASTIC_USE_AGENT_STORE, its default), the first attempt's rank 0 makes a new
    name and keeps it there. Where each attempt has a store of its own (an etcd rendezvous, or
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), nothing survives an attempt in it: the job is its
    rendezvous id (TORCHELASTIC_RUN_ID, a new one under --standalone, else --rdzv-id), from the
    first attempt on, so that its restarts find the first attempt's checkpoints."""
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return run_id
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        if rank == 0:
            store.set(JOB_KEY, uuid.uuid4().hex)
        return store.get(JOB_KEY).decode()
    # a restart: the first attempt wrote it, unless its rank 0 ended before it could (then that
    # attempt made no run folder, and the run id is as good a name as any)
    return store.get(JOB_KEY).decode() if store.check([JOB_KEY]) else run_id


class Ranks:
    """This process's place among the job's, and the exchanges the Trainer makes with the others.
    `backend`: what this rank would reduce the gradients over (backend_for); gloo unless every
    rank asks for nccl. Every exchange that fails raises LostRanks."""

    torchrun = True

    def __init__(self, backend: str = "gloo"):
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        # the store of this attempt alone: after a restart (--max-restarts), torchrun's store still
        # holds the addresses of the attempt before, whose processes are gone
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and self.rank == 0
        store = dist.TCPStore(host, port, self.world_size, is_master=hosts, timeout=timeout)
        self.job = job_name(store, self.rank)
        store = dist.PrefixStore(f"ppo_breakout/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        # objects and flags go over gloo, on the CPU; the gradients too, unless every rank can use nccl
        # (one communicator has one backend: a node whose ranks share a GPU makes it gloo for all)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        self.backend = "nccl" if all(b == "nccl" for b in self.gather(backend)) else "gloo"
        self.tensors = dist.new_group(backend="nccl", timeout=timeout) if self.backend == "nccl" else None

    def average_gradients(self, parameters):
        """Every rank's gradients replaced by their mean over the ranks: one flat all-reduce."""
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with exchanging():
            dist.all_reduce(flat, group=self.tensors)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of `x` over the ranks."""
        x = x.clone()
        with exchanging():
            dist.all_reduce(x, group=self.tensors)
        return x / self.world_size

    def mean_std(self, x: torch.Tensor):
        """The mean and (unbiased) standard deviation of `x` over every rank's `x` together."""
        sums = torch.stack([x.double().sum(), (x.double() ** 2).sum(), torch.tensor(x.numel(), device=x.device)])
        with exchanging():
            dist.all_reduce(sums, group=self.tensors)
        total, squares, n = sums
        mean = total / n
        return mean.to(x.dtype), ((squares - n * mean**2) / (n - 1)).clamp(min=0).sqrt().to(x.dtype)

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order (rank 0 writes them into a checkpoint, reports them)."""
        gathered = [None] * self.world_size
        with exchanging():
            dist.all_gather_object(gathered, value)
        return gathered

    def all_games(self, games: List[dict]) -> List[dict]:
        return [game for rank_games in self.gather(games) for game in rank_games]

    def from_rank_0(self, value):
        box = [value]
        with exchanging():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def largest(self, value: int) -> int:
        flag = torch.tensor([int(value)])
        with exchanging():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def hold(self, hyperparams: Dict[str, "ppo.CheckedValue"]):
        """Rank 0's dynamic hyperparameters now (where the dashboard changes them), held by every
        rank for this update."""
        for hyperparam in hyperparams.values():
            hyperparam.held = None  # rank 0 reads the dashboard's value, not the last update's
        values = self.from_rank_0({name: hyperparam() for name, hyperparam in hyperparams.items()})
        for name, hyperparam in hyperparams.items():
            hyperparam.held = values[name]

    def checkpoint_from_rank_0(self, path: Optional[str]) -> Optional[Tuple[Path, dict]]:
        """The checkpoint file `path` of rank 0's machine (None: there is none; the other ranks'
        `path` is not read), read there and sent to every rank, each of which reads it as
        `run_files.load_checkpoint` does: (path, checkpoint), or None. The ranks need no shared
        filesystem."""
        sent = (path, Path(path).read_bytes()) if self.rank == 0 and path is not None else None
        received = self.from_rank_0(sent)
        return None if received is None else run_files.load_checkpoint(received[0], data=received[1])

    def close(self):
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def local_devices(c: "ppo.RunSettings", local_world_size: int) -> List[str]:
    """The device of each rank on this machine, or raises ValueError naming what is wrong
    (cli.config_errors has checked the settings that do not depend on the ranks)."""
    try:
        ids = [int(i) for i in c.device_ids.split(",")] if c.device_ids else None
    except ValueError:
        raise ValueError(f"argument --device-ids: GPU numbers separated by commas, got {c.device_ids!r}") from None
    if ids is not None and len(ids) != local_world_size:
        raise ValueError(f"argument --device-ids: {len(ids)} GPUs for {local_world_size} ranks on this machine")
    if ppo.parse_device(c.device).type == "cpu":
        if ids is not None:
            raise ValueError("argument --device-ids: names GPUs, but the device is the CPU")
        return ["cpu"] * local_world_size
    gpus = torch.cuda.device_count()
    for gpu in ids if ids is not None else []:
        if not 0 <= gpu < gpus:
            raise ValueError(f"argument --device-ids: there is no GPU {gpu} ({gpus} here)")
    return [f"cuda:{gpu}" for gpu in (ids if ids is not None else [r % gpus for r in range(local_world_size)])]


def backend_for(c: "ppo.RunSettings", devices: List[str]) -> str:
    """What the gradients are reduced over for ranks on `devices` (this machine's, local_devices):
    nccl where each rank has a GPU of its own, unless --backend says gloo; gloo on the CPU, and
    where ranks share a GPU, since NCCL refuses two ranks of one communicator on one GPU ("Duplicate
    GPU detected"; gloo reduces CUDA tensors through the host). Raises ValueError for an explicit
    --backend nccl that cannot serve `devices`."""
    shared = sorted({d for d in devices if devices.count(d) > 1})
    if c.backend == "nccl" and "cpu" in devices:
        raise ValueError("argument --backend: nccl needs CUDA; use gloo on the CPU")
    if c.backend == "nccl" and shared:
        raise ValueError(
            f"argument --backend: nccl cannot have ranks share a GPU ({devices.count(shared[0])} ranks on "
            f"{shared[0]}); use auto or gloo"
        )
    return "gloo" if c.backend == "gloo" or "cpu" in devices or shared else "nccl"


def device_for(c: "ppo.RunSettings", local_rank: int, local_world_size: int) -> str:
    """The device of this rank, or raises ValueError naming what is wrong with the devices or the
    backend (what bench.py checks before it starts torchrun)."""
    devices = local_devices(c, local_world_size)
    backend_for(c, devices)
    return devices[local_rank]


def kept_by_rank_0(job: str, run_settings: "ppo.RunSettings", resumed: bool) -> str:
    """What the job keeps when it ends early: its newest checkpoint, whichever attempt wrote it (the
    update under way when the ranks were lost writes none), from which a restart or --resume goes on."""
    path = run_files.job_checkpoint(job)
    if path is not None:
        return f"the job's newest checkpoint stays: update {run_files.update_of(Path(path))} ({path})"
    also = "; the checkpoint it resumed from stays" if resumed else ""
    return f"no checkpoint of this job yet (one every {run_settings.checkpoint_every} updates){also}"


def main(argv: List[str]) -> int:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if rank != 0:  # rank 0 alone prints; the others say only what went wrong
        sys.stdout = open(os.devnull, "w")
    problem, device, backend, said = None, "cpu", "gloo", io.StringIO()
    run_settings, checkpoint = None, None
    try:
        with contextlib.redirect_stderr(said):
            # rank 0 reads a --resume checkpoint, and sends it to the others below
            configs, run_settings, checkpoint, comment, dashboard_flag = cli.parse(argv, read_resume=rank == 0)
        devices = local_devices(run_settings, int(os.environ["LOCAL_WORLD_SIZE"]))
        device, backend = devices[local_rank], backend_for(run_settings, devices)
    except SystemExit as e:
        if e.code == 0:  # --help
            return 0
        problem = (said.getvalue().strip().splitlines() or [f"ppo_breakout.py: error: exit {e.code}"])[-1]
    except ValueError as e:
        problem = f"ppo_breakout.py: error: {e}"
    ranks = Ranks(backend)
    try:
        bad = [(r, p) for r, p in enumerate(ranks.gather(problem)) if p]
        if bad:  # one line, from rank 0, before any game starts; every rank exits 2
            if rank == 0:
                r, p = bad[0]
                print(p if r == 0 else p.replace("error: ", f"error: rank {r}: ", 1), file=sys.stderr)
            return 2
        if device != "cpu":
            torch.cuda.set_device(device)
        # a restarted job (torchrun --max-restarts) goes on from its own newest checkpoint, with its
        # configuration: what the dashboard changed before the restart goes on, not the launch flags;
        # else from --resume's, with the flags over it. Rank 0 reads either and sends it to every rank.
        restart = run_files.job_checkpoint(ranks.job) if rank == 0 else None
        restarted = ranks.from_rank_0(restart is not None)
        resume = checkpoint["path"] if rank == 0 and checkpoint is not None else None
        found = ranks.checkpoint_from_rank_0(restart or resume)
        if found is not None:
            path, checkpoint = found
            if restarted:
                configs = ppo.settings_from(ppo.Configs, checkpoint["configs"])
                comment = f"continues job {ranks.job} from update {checkpoint['update']} ({path})"
            else:
                configs = cli.resumed_configs(checkpoint, argv)
        run_settings = dataclasses.replace(run_settings, device=device, cuda_graphs=False)
        seed = np.random.SeedSequence([configs.seed, rank, checkpoint["update"] if checkpoint else 0])
        action_seed = int(seed.generate_state(1)[0])
        dashboard_flag = dashboard_flag if rank == 0 else "off"
        # train's stop handlers hold SIGTERM while it trains, and put this back when it ends: torchrun's
        # SIGTERM to the ranks that survive a lost one often comes just after, and must not end this
        # rank before it has said what the job keeps (torchrun kills a rank that does not end)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        given = tuple(cli.given_flags(argv))
        return cli.train(configs, run_settings, checkpoint, comment, dashboard_flag, ranks, action_seed, given)
    except (LostRanks, RuntimeError, OSError, run_files.RunFileError) as e:
        # a failed exchange: another rank is gone; anything else is this rank's own, said with its type
        what = f"lost the other ranks ({e})" if isinstance(e, LostRanks) else f"{type(e).__name__}: {first_line(e)}"
        kept = "rank 0 keeps the run"
        if rank == 0 and run_settings is not None:
            kept = kept_by_rank_0(ranks.job, run_settings, checkpoint is not None)
        print(f"ppo_breakout.py: error: rank {rank}: {what}; {kept}", file=sys.stderr)
        return 1
    finally:
        ranks.close()
