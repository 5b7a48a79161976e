"""
The speed machinery under `ppo_breakout.py`'s Trainer: none of it changes what is computed, only how
fast (and, for bf16 and `Backward`'s shares, the rounding: the numbers stay a function of the
settings). Each piece is switched by a run setting and measured in docs/speed.md. This module imports
torch and nothing of the project's, so the experiment reads as the algorithm and calls these
through one small interface each:

- `paths`: which of them a trainer on a device takes, set up for it;
- `TrainStep`: one minibatch's gradient step, run eagerly or replayed as a CUDA graph;
- `Backward`: a minibatch's gradient, on a CPU in shares that threads compute side by side;
- `Forward`: the rollout's forward pass, eagerly or as a CUDA graph per batch size;
- `autocast_dtype` and `autocast`: bf16 autocast only where the hardware computes bf16 natively;
- `reuse_freed_memory` and `torch_threads`: the allocator's and the rollout's thread settings.
"""

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `--precision`, or None for plain fp32. `auto` takes bf16 only where the
    hardware computes it natively (emulated bf16 is slower than fp32): a GPU of compute capability
    8.0 or later (Ampere on; a T4 emulates it, though `torch.cuda.is_bf16_supported()` says yes), an
    AVX-512 bf16 or AMX CPU."""
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else None
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else None
    return None


def paths(device: torch.device, precision: str, reuse: bool, graphs: bool) -> Tuple[Optional[torch.dtype], bool, bool]:
    """The speed paths a trainer on `device` takes: (its autocast dtype or None, whether freed
    memory is kept, whether it records CUDA graphs), set up for it."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # two input shapes: time cuDNN's kernels once for each
    return autocast_dtype(precision, device), reuse and reuse_freed_memory(), graphs and device.type == "cuda"


def autocast(device: torch.device, dtype: Optional[torch.dtype], graphs: bool):
    """Autocast to `dtype` on `device` (None: off). A CUDA graph casts the weights at every replay:
    no cached casts there."""
    return torch.autocast(device.type, dtype, enabled=dtype is not None, cache_enabled=not graphs)


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory in the heap, for this process and workers forked after it: by
    default it maps each large block anew and unmaps it when freed, so every minibatch faults its
    tens of MB in again page by page. False where malloc is not glibc's."""
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameters, from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # 32 MiB is the largest mmap threshold glibc accepts; keep up to 1 GiB of free heap
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


@contextlib.contextmanager
def torch_threads(threads: int):
    """`threads` torch threads inside (0: unchanged): the rollout's forward passes are small
    batches, and idle torch threads spin on the workers' cores."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Backward:
    """A minibatch's gradient into the parameters' `.grad`: `backward(loss_fn, rows)` calls
    `loss_fn(rows) -> (loss, stats)`, the mean loss over `rows` (a dict of tensors, a row a sample)
    and a tensor of its statistics' means, and returns the statistics.

    On a GPU the whole minibatch at once, one share. On a CPU in `shares` slices of the minibatch's
    `rows` (0: as many as torch has threads, the cores), which up to as many threads compute side by
    side (no more than torch's thread count), each single-threaded, weighted by its share of the
    rows and summed in their order: the same loss. When another program holds a core, a thread it
    delays holds back its own slice, once a step; torch's threads, splitting every operation between
    them, would wait for it at each of a step's hundreds of operations (docs/speed.md, "Beside other
    work"). The numbers depend on `shares`, not on how many threads ran them, nor on the load."""

    def __init__(self, params, device: torch.device, shares: int, rows: int):
        self.params = list(params)
        self.shares, self.pool = 1, None  # on a GPU
        if device.type == "cpu":
            self.shares = shares or min(torch.get_num_threads(), rows)
            if not 1 <= self.shares <= rows:
                raise ValueError(f"train_threads: {shares} shares of a minibatch of {rows} samples")
            threads = min(self.shares, torch.get_num_threads())
            self.pool = ThreadPoolExecutor(threads, "train", initializer=torch.set_num_threads, initargs=(1,))

    def __call__(self, loss_fn: Callable, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pool is None:
            loss, stats = loss_fn(rows)
            loss.backward()
            return stats
        size = len(next(iter(rows.values())))
        bounds = [size * k // self.shares for k in range(self.shares + 1)]

        def share(start: int, end: int):
            loss, stats = loss_fn({k: v[start:end] for k, v in rows.items()})
            weight = (end - start) / size
            return torch.autograd.grad(loss * weight, self.params), stats * weight

        grads, stats = zip(*self.pool.map(share, bounds[:-1], bounds[1:]))
        for i, p in enumerate(self.params):
            p.grad = sum(g[i] for g in grads)
        return sum(stats)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def gather_rows(x: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
    """`x[indexes]` along the first dimension, copied a whole sample at a time (advanced indexing
    copies element by element). An NHWC batch is gathered as the [batch, 84, 84, 4] rows it is
    stored as, and stays NHWC."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.index_select(x.permute(0, 2, 3, 1), 0, indexes).permute(0, 3, 1, 2)
    return torch.index_select(x, 0, indexes)


class CudaGraph:
    """`fn(inputs)` recorded as a CUDA graph: the model is small, so launching its dozens of kernels
    one by one from Python costs more than running them. Fill `inputs` (a dict of device tensors)
    in place, then call: the recorded kernels run and the same `output` tensors come back every
    time. `fn` first runs 3 times on a side stream, as capture requires: undo any effect it has."""

    def __init__(self, fn: Callable, inputs: Dict[str, torch.Tensor]):
        self.inputs, stream = inputs, torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(inputs)

    def __call__(self):
        self.graph.replay()
        return self.output


class Forward:
    """`fn({"obs": obs})` on `device` for a batch of observations: eagerly, or with `graphs` as a
    CUDA graph recorded at the first batch of each size."""

    def __init__(self, fn: Callable, device: torch.device, graphs: bool):
        self.fn, self.device, self.graphs = fn, device, graphs
        self.recorded: Dict[int, CudaGraph] = {}

    def __call__(self, obs: torch.Tensor):
        if not self.graphs:
            return self.fn({"obs": obs.to(self.device)})
        if len(obs) not in self.recorded:
            self.recorded[len(obs)] = CudaGraph(self.fn, {"obs": obs.to(self.device)})
        graph = self.recorded[len(obs)]
        graph.inputs["obs"].copy_(obs)
        return graph()


class TrainStep:
    """One minibatch's gradient step: `step(samples, indexes, coefficients) -> statistics` gathers
    the rows `indexes` of `samples`, sets the optimizer's learning rate to
    `coefficients.learning_rate`, and calls `fn(minibatch, coefficients)`, which takes the step and
    returns a tensor of statistics. `coefficients` is a dataclass of floats. On a CPU the step runs
    on one torch thread (its backward pass in `Backward`'s threads), so that each of its sums comes
    out the same however many cores the machine has."""

    def __init__(self, fn: Callable, optimizer: torch.optim.Optimizer, device: torch.device):
        self.fn, self.optimizer = fn, optimizer
        self.threads = 1 if device.type == "cpu" else 0

    def __call__(self, samples: Dict[str, torch.Tensor], indexes: torch.Tensor, coefficients):
        for group in self.optimizer.param_groups:
            group["lr"] = coefficients.learning_rate
        with torch_threads(self.threads):
            mini_batch = {k: gather_rows(v, indexes) for k, v in samples.items()}
            return self.fn(mini_batch, coefficients)


class GraphedTrainStep(TrainStep):
    """The same step replayed as a CUDA graph, recorded at the first call: the minibatch is gathered
    into the graph's input buffers, and the coefficients are copied into device tensors the graph
    reads (`fn` gets a copy of the dataclass holding zero-dimensional tensors: a graph replays what
    it read at capture). The optimizer's learning rate becomes a device tensor and its step
    `capturable`; a checkpoint saves them as before."""

    def __init__(self, fn: Callable, optimizer: torch.optim.Optimizer, mini_batch_size: int):
        super().__init__(fn, optimizer, torch.device("cuda"))
        self.mini_batch_size = mini_batch_size
        self.graph: Optional[CudaGraph] = None
        self.tensors = None  # the coefficients as the graph reads them
        self.values = None  # the coefficients the graph's tensors hold

    def _record(self, samples: Dict[str, torch.Tensor], coefficients):
        group = self.optimizer.param_groups[0]
        device = next(iter(samples.values())).device
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["capturable"] = True
        inputs = {k: v[: self.mini_batch_size].clone() for k, v in samples.items()}
        zeros = {field.name: torch.zeros((), device=device) for field in dataclasses.fields(coefficients)}
        self.tensors = dataclasses.replace(coefficients, **zeros)
        # the capture's warm-up takes real steps: put the weights and Adam's state back after it
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        weights = [p.detach().clone() for p in params]
        state = self.optimizer.state
        moments = {p: {k: v.clone() for k, v in state[p].items()} for p in state}
        self.graph = CudaGraph(lambda x: self.fn(x, self.tensors), inputs)
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
                for k, v in state[p].items():
                    if p in moments:
                        v.copy_(moments[p][k])
                    else:  # there was no state yet: a fresh Adam
                        v.zero_()

    def __call__(self, samples: Dict[str, torch.Tensor], indexes: torch.Tensor, coefficients):
        if self.graph is None:
            self._record(samples, coefficients)
        inputs = self.graph.inputs
        for k, v in samples.items():
            torch.index_select(v, 0, indexes, out=inputs[k])
        if coefficients != self.values:  # a fill is a kernel launch: only on a change
            self.optimizer.param_groups[0]["lr"].fill_(coefficients.learning_rate)
            for field in dataclasses.fields(coefficients):
                getattr(self.tensors, field.name).fill_(getattr(coefficients, field.name))
            self.values = coefficients
        # a copy: the graph's output tensors are overwritten at the next replay
        return self.graph().clone()
