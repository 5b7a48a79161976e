"""
The same experiment under torchrun: N processes (ranks) train one policy.

    torchrun --standalone --nproc_per_node=2 ppo_breakout.py [flags]          # 2 ranks on this machine
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=JOB ppo_breakout.py [flags]                                   # on each of 2 machines
    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=4 --rdzv-backend=c10d \\
        --rdzv-endpoint=$(hostname):29500 --rdzv-id=$SLURM_JOB_ID ppo_breakout.py [flags]   # SLURM

`ppo_breakout.main` hands a process that torchrun started to `main` here. What the ranks share, through
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
- Faults: every collective times out after COLLECTIVE_TIMEOUT_S. A rank whose game worker dies
  ends with a line naming itself and the worker, and torchrun ends the other ranks. Under
  `torchrun --max-restarts K` a restarted job goes on from the newest checkpoint of its own job:
  each run folder the job makes holds the job's name, which its first attempt keeps in torchrun's
  store (a new torchrun job has a store of its own, so it never takes another job's checkpoint).
- Devices: gloo on the CPU, nccl on CUDA (gloo carries the small exchanges either way). Rank r
  uses cuda:LOCAL_RANK, or the GPU `--device-ids` names for it: `--device-ids 0,0` puts 2 ranks on
  one GPU. CUDA graphs are off under torchrun: the gradients' all-reduce sits inside the step.
"""

import contextlib
import dataclasses
import io
import os
import sys
import uuid
from datetime import timedelta
from typing import List

import numpy as np
import torch
import torch.distributed as dist

import cli
import ppo_breakout as ppo
import run_files

COLLECTIVE_TIMEOUT_S = 60  # a rank that waits longer than this on the others gives up: the job ends


class Held:
    """A dynamic hyperparameter's value, held for an update: called as labml's are."""

    def __init__(self, value):
        self._value = value

    def __call__(self):
        return self._value


class Ranks:
    """This process's place among the job's, and the exchanges the Trainer makes with the others."""

    torchrun = True

    def __init__(self, backend: str):
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        # the store of this attempt alone: after a restart (--max-restarts), torchrun's store still
        # holds the addresses of the attempt before, whose processes are gone
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and self.rank == 0
        store = dist.TCPStore(host, port, self.world_size, is_master=hosts, timeout=timeout)
        # the job's name, made by its first attempt's rank 0 and kept in torchrun's store for the
        # attempts after it: a new torchrun job has a new store, so it never takes another's checkpoints
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and self.rank == 0:
            store.set("ppo_breakout/job", uuid.uuid4().hex)
        self.job = store.get("ppo_breakout/job").decode()
        store = dist.PrefixStore(f"ppo_breakout/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        # objects and flags go over gloo, on the CPU; the gradients too, unless over nccl
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        self.tensors = dist.new_group(backend="nccl", timeout=timeout) if backend == "nccl" else None
        self.live = None  # rank 0's labml dynamic hyperparameters, which the dashboard changes

    def average_gradients(self, parameters):
        """Every rank's gradients replaced by their mean over the ranks: one flat all-reduce."""
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.tensors)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of `x` over the ranks."""
        x = x.clone()
        dist.all_reduce(x, group=self.tensors)
        return x / self.world_size

    def mean_std(self, x: torch.Tensor):
        """The mean and (unbiased) standard deviation of `x` over every rank's `x` together."""
        sums = torch.stack([x.double().sum(), (x.double() ** 2).sum(), torch.tensor(x.numel(), device=x.device)])
        dist.all_reduce(sums, group=self.tensors)
        total, squares, n = sums
        mean = total / n
        return mean.to(x.dtype), ((squares - n * mean**2) / (n - 1)).clamp(min=0).sqrt().to(x.dtype)

    def all_games(self, games: List[dict]) -> List[dict]:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, games)
        return [game for rank_games in gathered for game in rank_games]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order (rank 0 writes them into a checkpoint)."""
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def from_rank_0(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def largest(self, value: int) -> int:
        flag = torch.tensor([int(value)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def hold_dynamic(self, trainer: "ppo.Trainer"):
        """Rank 0's dynamic hyperparameters now, held by every rank for this update."""
        if self.live is None:
            self.live = {name: getattr(trainer, name) for name in ppo.DYNAMIC}
        values = self.from_rank_0({name: param() for name, param in self.live.items()} if self.rank == 0 else None)
        for name, value in values.items():
            if self.rank != 0:
                self.live[name]._value = value  # what a checkpoint would save
            setattr(trainer, name, Held(value))

    def close(self):
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def device_for(c: "ppo.RunSettings", local_rank: int, local_world_size: int) -> str:
    """The device of this rank, or raises ValueError naming what is wrong (cli.config_errors has
    checked the settings that do not depend on the rank)."""
    try:
        ids = [int(i) for i in c.device_ids.split(",")] if c.device_ids else None
    except ValueError:
        raise ValueError(f"argument --device-ids: GPU numbers separated by commas, got {c.device_ids!r}") from None
    if ids is not None and len(ids) != local_world_size:
        raise ValueError(f"argument --device-ids: {len(ids)} GPUs for {local_world_size} ranks on this machine")
    device = ppo.parse_device(c.device)
    if device.type == "cpu":
        if ids is not None:
            raise ValueError("argument --device-ids: names GPUs, but the device is the CPU")
        if c.backend == "nccl":
            raise ValueError("argument --backend: nccl needs CUDA; use gloo on the CPU")
        return "cpu"
    gpu = ids[local_rank] if ids is not None else local_rank % torch.cuda.device_count()
    if not 0 <= gpu < torch.cuda.device_count():
        raise ValueError(f"argument --device-ids: there is no GPU {gpu} ({torch.cuda.device_count()} here)")
    return f"cuda:{gpu}"


def main(argv: List[str]) -> int:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if rank != 0:  # rank 0 alone prints; the others say only what went wrong
        sys.stdout = open(os.devnull, "w")
    problem, device, said = None, "cpu", io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            configs, run_settings, checkpoint, comment, dashboard_flag = cli.parse(argv)
        device = device_for(run_settings, local_rank, int(os.environ["LOCAL_WORLD_SIZE"]))
    except SystemExit as e:
        if e.code == 0:  # --help
            return 0
        problem = (said.getvalue().strip().splitlines() or [f"ppo_breakout.py: error: exit {e.code}"])[-1]
    except ValueError as e:
        problem = f"ppo_breakout.py: error: {e}"
    ranks = Ranks("nccl" if problem is None and device != "cpu" and run_settings.backend != "gloo" else "gloo")
    try:
        problems = [None] * ranks.world_size
        dist.all_gather_object(problems, problem)
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:  # one line, from rank 0, before any game starts; every rank exits 2
            if rank == 0:
                r, p = bad[0]
                print(p if r == 0 else p.replace("error: ", f"error: rank {r}: ", 1), file=sys.stderr)
            return 2
        if device != "cpu":
            torch.cuda.set_device(device)
        # a restarted job (torchrun --max-restarts) goes on from its own newest checkpoint
        found = ranks.from_rank_0(run_files.job_checkpoint(ranks.job) if rank == 0 else None)
        if found is not None:
            path, checkpoint = run_files.load_checkpoint(found)
            configs = cli.resumed_configs(checkpoint, argv)
            comment = f"continues job {ranks.job} from update {checkpoint['update']} ({path})"
        run_settings = dataclasses.replace(run_settings, device=device, cuda_graphs=False)
        seed = np.random.SeedSequence([configs.seed, rank, checkpoint["update"] if checkpoint else 0])
        action_seed = int(seed.generate_state(1)[0])
        try:
            dashboard_flag = dashboard_flag if rank == 0 else "off"
            return ppo.train(configs, run_settings, checkpoint, comment, dashboard_flag, ranks, action_seed)
        except RuntimeError as e:  # a collective failed: another rank is gone
            print(
                f"ppo_breakout.py: error: rank {rank}: lost the other ranks: {str(e).splitlines()[0]}", file=sys.stderr
            )
            return 1
    finally:
        ranks.close()
