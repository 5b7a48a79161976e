"""The experiment under torchrun: real ranks over gloo on the CPU, real game workers."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import ROOT, TINY, TINY_FLAGS, checkpointed_last_update, copy_script, descendants, metrics_files, wait_for

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(folder: Path, *args, restarts: int = 0, env: Optional[dict] = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 ppo_breakout.py args...` in `folder`, in a session
    of its own, `env` added to its environment; its output goes to folder/torchrun.log."""
    return subprocess.Popen(
        [*TORCHRUN, f"--max-restarts={restarts}", "ppo_breakout.py", "--dashboard", "off", *args],
        cwd=folder,
        env={**os.environ, **(env or {})},
        stdout=open(folder / "torchrun.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def patch_script(folder: Path, code: str):
    """Run `code` in the copy of ppo_breakout.py in `folder` as the module is loaded, before main."""
    script = folder / "ppo_breakout.py"
    entry = '\nif __name__ == "__main__":'
    source = script.read_text()
    assert source.count(entry) == 1
    script.write_text(source.replace(entry, "\n" + textwrap.dedent(code) + entry))


def errors(log: str) -> list:
    """Our one-line reports in a torchrun log (torchrun's own are its report); one may follow rank
    0's progress on its line, which labml ends with no newline."""
    return re.findall(r"ppo_breakout\.py: error: .*", log)


def rank_pid(torchrun_pid: int, rank: int, worker: bool = False) -> int:
    """The pid of the ppo_breakout.py process of `rank` under torchrun, or of one of its game workers."""
    for pid in descendants(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and (parent == torchrun_pid) != worker:
            return pid
    raise AssertionError(f"no rank {rank} under {torchrun_pid}")


def run_script(tmp_path: Path, body: str) -> str:
    """`body` run by 2 ranks under torchrun, after `import ppo_breakout as ppo, distributed`; what
    rank 0 prints."""
    script = tmp_path / "ranks.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "import torch, torch.distributed as dist\nimport ppo_breakout as ppo, distributed\n" + textwrap.dedent(body)
    )
    result = subprocess.run([*TORCHRUN, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_ranks_keep_identical_weights_count_every_ranks_games_and_take_a_dashboard_change_together(tmp_path):
    out = run_script(
        tmp_path,
        f"""
        ranks = distributed.Ranks("gloo")
        local = []
        gather = ranks.all_games
        ranks.all_games = lambda games: (local.append(list(games)), gather(games))[1]
        # 200 steps a worker: games of a random policy end in that time
        trainer = ppo.Trainer(*ppo.settings(**dict({TINY!r}, worker_steps=200, batches=4)), partner=ranks)
        torch.manual_seed(ranks.rank)  # each rank its own actions, as distributed.main does
        used = [trainer.train(trainer.sample())["clip_range"]]
        if ranks.rank == 0:
            trainer.clip_range.set_value(0.2)  # what labml does with a change from the dashboard
        used.append(trainer.train(trainer.sample())["clip_range"])
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        everyone = [None] * 2
        dist.all_gather_object(everyone, (used, weights, local, trainer.games, list(trainer.episode_rewards)))
        trainer.destroy()
        if ranks.rank == 0:
            (used0, w0, local0, games0, rewards0), (used1, w1, local1, games1, rewards1) = everyone
            assert used0 == used1 == [0.1, 0.2], (used0, used1)
            assert torch.equal(w0, w1), "the ranks' weights differ"
            assert games0 == games1 == local0[-1] + local1[-1] and local0[-1] and local1[-1]
            assert rewards0 == rewards1 and len(rewards0) == sum(len(g) for g in local0 + local1)
            print("ok")
        ranks.close()
        """,
    )
    assert out.strip().endswith("ok")


def test_a_minibatch_step_with_two_ranks_equals_one_process_on_the_same_samples(tmp_path):
    out = run_script(
        tmp_path,
        f"""
        ranks = distributed.Ranks("gloo")
        config = dict({TINY!r}, precision="fp32")
        torch.manual_seed(7)  # the same minibatch of 64 samples on both ranks; each takes its half
        batch = dict(
            obs=torch.randint(0, 256, (64, 4, 84, 84), dtype=torch.uint8),
            actions=torch.randint(0, 4, (64,)),
            values=torch.randn(64),
            log_pis=torch.log(torch.rand(64) * 0.5 + 0.1),
            advantages=torch.randn(64) * 2 + 0.5,
        )
        coefficients = ppo.Coefficients(
            learning_rate=1e-3, clip_range=0.1, value_loss_coef=0.5, entropy_bonus_coef=0.01
        )
        half = {{k: v[32 * ranks.rank : 32 * (ranks.rank + 1)] for k, v in batch.items()}}
        with ppo.Trainer(*ppo.settings(**config), partner=ranks) as shared:
            shared._train_step(half, coefficients)
            weights = torch.cat([p.detach().flatten() for p in shared.model.parameters()])
        if ranks.rank == 0:
            with ppo.Trainer(*ppo.settings(**config)) as alone:  # the same initial weights, from the same seed
                alone._train_step(batch, coefficients)
                expected = torch.cat([p.detach().flatten() for p in alone.model.parameters()])
            print("max difference", (weights - expected).abs().max().item())
            assert torch.allclose(weights, expected, rtol=1e-4, atol=1e-6)
            print("ok")
        ranks.close()
        """,
    )
    assert out.strip().endswith("ok")


def test_rank_0_sends_its_checkpoint_to_every_rank_so_that_they_need_no_shared_filesystem(tmp_path):
    out = run_script(
        tmp_path,
        """
        import os, run_files
        ranks = distributed.Ranks("gloo")
        # each rank's own disk: a folder of its own, where a checkpoint file of the same name differs
        os.chdir(os.makedirs(f"machine_{ranks.rank}") or f"machine_{ranks.rank}")
        mine = dict(format=run_files.CHECKPOINT_FORMAT, configs=dict(game="breakout"), n_actions=4)
        torch.save(dict(mine, update=7 if ranks.rank == 0 else 3), "update_0000007.pt")
        found = ranks.checkpoint_from_rank_0("update_0000007.pt" if ranks.rank == 0 else None)
        none = ranks.checkpoint_from_rank_0(None if ranks.rank == 0 else "update_0000007.pt")
        everyone = ranks.gather((str(found[0]), found[1]["update"], none))
        if ranks.rank == 0:
            assert everyone == [("update_0000007.pt", 7, None)] * 2, everyone  # rank 0's, on every rank
            print("ok")
        ranks.close()
        """,
    )
    assert out.strip().endswith("ok")


def checkpoints(folder: Path) -> list:
    """The checkpoints of the runs under `folder`, oldest update first."""
    found = folder.glob("logs/ppo_breakout/*/checkpoints/update_*.pt")
    return sorted(found, key=lambda path: int(path.stem.removeprefix("update_")))


def checkpoints_named_kept(log: str) -> set:
    """The checkpoints the lines of a job's log say it keeps: rank 0's when it lost the others, and
    any rank's own when it failed ("the last checkpoint is ...")."""
    lost = re.findall(r"the job's newest checkpoint stays: update (\d+) \((\S+?\.pt)\)", log)
    assert all(Path(path).name == f"update_{int(update):07d}.pt" for update, path in lost), lost
    own = re.findall(r"the last checkpoint is (\S+?\.pt);", log)
    return {Path(path).resolve() for path in [path for _, path in lost] + own}


# the rank itself before the job's first checkpoint (one every 50 updates); a game worker of either
# rank after it, as the job's newest checkpoint is named however it ends
KILLED = {"the rank": (1, False), "a game worker of the rank": (1, True), "a game worker of rank 0": (0, True)}


@pytest.mark.parametrize("rank,worker", KILLED.values(), ids=KILLED.keys())
def test_a_killed_rank_ends_the_job_within_60_s_naming_it_and_the_checkpoint_kept_and_leaves_no_process(
    tmp_path, rank, worker
):
    folder = copy_script(tmp_path)
    every = ["--checkpoint-every", "1"] if worker else []
    job = torchrun(folder, "--updates", "100000", *every, *TINY_FLAGS)
    try:
        if worker:
            wait_for(lambda: checkpoints(folder), 120, "the first checkpoint")
        else:
            wait_for(lambda: metrics_files(folder), 120, "the first update")
        killed = rank_pid(job.pid, rank, worker)
        os.kill(killed, signal.SIGKILL)
        killed_at = time.monotonic()
        code = job.wait(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    log = (folder / "torchrun.log").read_text()
    assert code != 0
    # torchrun's report has a block for each rank that failed; which one it calls the root cause is
    # a race between the failed rank's end and the other's lost collective, so the blocks are read, not their order
    blocks = re.split(r"\n\[\d+\]:\n", log.split("Failures:", 1)[-1])
    (failed,) = [block for block in blocks if f"rank      : {rank} (local_rank: {rank})" in block]
    other = 1 - rank
    (survivor,) = [line for line in errors(log) if f"rank {other}:" in line]
    assert f"rank {other}: lost the other ranks (" in survivor, log[-3000:]
    if not worker:
        assert f"Signal 9 (SIGKILL) received by PID {killed}" in failed, log[-3000:]
        # the survivor says what the job keeps: nothing yet (one every 50 updates)
        assert survivor.endswith("no checkpoint of this job yet (one every 50 updates)"), survivor
        return
    # the rank named the worker that died and what it lost, and ended
    died = rf"error: rank {rank}: worker \d \(pid {killed}\) died: killed by signal SIGKILL; "
    assert re.search(died + "the update in progress is lost; ", log), log[-3000:]
    assert "exitcode  : 1 " in failed, log[-3000:]
    # some line names the checkpoint the job keeps, its newest: rank 0's, whichever rank's worker died
    assert checkpoints(folder)[-1].resolve() in checkpoints_named_kept(log), log[-3000:]
    assert all(path.exists() for path in checkpoints_named_kept(log))


def test_a_ranks_own_failure_is_reported_with_its_type_and_the_survivor_names_the_checkpoint_kept(tmp_path):
    folder = copy_script(tmp_path)
    patch_script(
        folder,
        """
        def _failing_on_rank_1(sample):
            def sample_or_fail(self):
                if os.environ["RANK"] == "1" and self.update == 2:  # the third update, after the checkpoint
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (a test's)\\nits second line")
                return sample(self)

            return sample_or_fail


        Trainer.sample = _failing_on_rank_1(Trainer.sample)
        """,
    )
    job = torchrun(folder, "--updates", "100000", "--checkpoint-every", "2", *TINY_FLAGS)
    try:
        assert job.wait(timeout=180) != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    log = (folder / "torchrun.log").read_text()
    ours = errors(log)
    # the rank says what failed in it, not that it lost the others
    failed = "ppo_breakout.py: error: rank 1: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (a test's);"
    assert [line for line in ours if line.startswith(failed)] and not [line for line in ours if "rank 1: lost" in line]
    # the survivor names update 2's checkpoint as what the job keeps: either it lost rank 1 in
    # update 3's first exchange, or torchrun's SIGTERM reached it while it was still writing update
    # 2's checkpoint (rank 1 fails at the start of update 3), and it stopped there
    (run,) = folder.glob("logs/ppo_breakout/*")
    kept = f"the job's newest checkpoint stays: update 2 ({(run / 'checkpoints' / 'update_0000002.pt').resolve()})"
    lost = [line for line in ours if "rank 0: lost the other ranks (" in line and line.endswith(kept)]
    stopped = [line for line in log.splitlines() if line == f"Stopped at update 2; checkpoint and metrics are in {run}"]
    assert len(lost + stopped) == 1, log[-3000:]
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["update_0000002.pt"]


# rank 1 on a machine of its own, which has no copy of the run a job resumes: an open of any file
# there fails, and says so on the rank's stderr (an audit hook sees every open: open(), io.open, os.open)
NOT_ON_RANK_1S_MACHINE = """
if os.environ["RANK"] == "1":

    def _not_on_this_machine(event, args, folder={folder!r}):
        path = args[0] if event == "open" else None
        if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(folder):
            os.write(2, f"rank 1 opened {{os.fsdecode(path)}}\\n".encode())  # past any redirect of sys.stderr
            raise FileNotFoundError(2, "No such file or directory (not on rank 1's machine)", os.fsdecode(path))

    sys.addaudithook(_not_on_this_machine)
"""


def test_a_resumed_job_reads_the_checkpoint_on_rank_0_alone_and_sends_it_to_the_others(tmp_path, short_run):
    folder = copy_script(tmp_path)
    patch_script(folder, NOT_ON_RANK_1S_MACHINE.format(folder=str(short_run)))
    checkpoint = short_run / "checkpoints" / "update_0000004.pt"  # a single process's, of the tiny configuration
    job = torchrun(folder, "--resume", str(checkpoint), "--updates", "5")
    try:
        code = job.wait(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    log = (folder / "torchrun.log").read_text()
    assert "rank 1 opened" not in log, log[-3000:]
    assert code == 0, log[-3000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    assert f"continues run {short_run.name} from update 4 ({checkpoint})" in (run / "run.yaml").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3, 4, 5]  # the run it continues, and its own update
    assert records[-1]["env_steps"] == 128 + 64  # 2 ranks x 2 workers x 16 steps on the checkpoint's 128
    state = torch.load(run / "checkpoints" / "update_0000005.pt", weights_only=True)
    assert len(state["ranks"]) == 2 and state["configs"]["updates"] == 5


def quiet(run: Path, seconds: float):
    """For wait_for: the newest checkpoint of `run`, once neither it nor the metrics have changed
    for `seconds`."""
    seen = dict(files=None, since=0.0)

    def newest_when_quiet() -> Optional[Path]:
        checkpoints = sorted((run / "checkpoints").glob("update_*.pt"))
        files = (len((run / "metrics.jsonl").read_text().splitlines()), checkpoints[-1] if checkpoints else None)
        if files != seen["files"]:
            seen.update(files=files, since=time.monotonic())
        return files[1] if time.monotonic() - seen["since"] >= seconds else None

    return newest_when_quiet


# torchrun's store lives as long as the job; an etcd rendezvous, or this variable, gives each attempt its own
STORES = {"torchrun's store": {}, "a store of each attempt": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}}


@pytest.mark.parametrize("env", STORES.values(), ids=STORES.keys())
def test_under_max_restarts_a_killed_rank_is_restarted_and_the_job_goes_on_from_its_checkpoint(tmp_path, env):
    folder = copy_script(tmp_path)
    args = ["--updates", "8", "--checkpoint-every", "2", "--clip-range", "0.2", *TINY_FLAGS]
    job = torchrun(folder, *args, restarts=1, env=env)
    try:
        first = wait_for(lambda: metrics_files(folder), 120, "the first update")[0]
        wait_for(lambda: len(first.read_text().splitlines()) >= 3, 120, "3 updates")
        rank_1 = rank_pid(job.pid, 1)
        os.kill(rank_1, signal.SIGSTOP)  # rank 0 soon waits for it in a collective, and writes nothing more
        checkpoint = wait_for(quiet(first.parent, 5), 50, "rank 0 to wait for rank 1")
        # the newest checkpoint, as a dashboard change of the clip range before the restart leaves it
        state = torch.load(checkpoint, weights_only=True)
        state["configs"]["clip_range"] = 0.3
        torch.save(state, checkpoint)
        os.kill(rank_1, signal.SIGKILL)
        killed_at = time.time()
        assert job.wait(timeout=300) == 0, (folder / "torchrun.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    log = (folder / "torchrun.log").read_text()
    runs = sorted(folder.glob("logs/ppo_breakout/*"), key=lambda run: (run / "metrics.jsonl").stat().st_mtime)
    assert len(runs) == 2 and len({(run / "torchrun_job").read_text() for run in runs}) == 1
    # the restart's own updates (its metrics may begin with those of the run it continues)
    resumed = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in resumed if r["time"] > killed_at]
    # it went on from the checkpoint edited, with its clip range, not the launch's --clip-range 0.2
    assert [r["update"] for r in resumed] == list(range(state["update"] + 1, 9)), [r["update"] for r in resumed]
    assert [r["clip_range"] for r in resumed] == pytest.approx([0.3] * len(resumed))
    assert (runs[1] / "checkpoints" / "update_0000008.pt").exists()
    # within a few seconds of the kill: no attempt waited COLLECTIVE_TIMEOUT_S for a job name no one wrote
    assert resumed[0]["time"] - killed_at < 60
    # the survivor said which checkpoint the job keeps: the one the restart went on from
    survivor = [line for line in errors(log) if "rank 0: lost the other ranks (" in line]
    kept = f"the job's newest checkpoint stays: update {state['update']} ({checkpoint.resolve()})"
    assert len(survivor) == 1 and survivor[0].endswith(kept), log[-3000:]


def test_sigterm_ends_the_job_with_one_checkpoint_and_a_new_job_trains_afresh_into_a_run_folder_of_its_own(tmp_path):
    folder = copy_script(tmp_path)
    job = torchrun(folder, "--updates", "100000", *TINY_FLAGS)
    try:
        wait_for(lambda: metrics_files(folder), 120, "the first update")
        job.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    stopped, last_update = checkpointed_last_update(folder)
    assert len(list((stopped / "checkpoints").glob("*.pt"))) == 1
    assert f"Stopped at update {last_update}" in (folder / "torchrun.log").read_text()

    # a new job beside it never takes that checkpoint: it starts at update 1, in a run folder of its own
    job = torchrun(folder, "--updates", "3", *TINY_FLAGS)
    assert job.wait(timeout=300) == 0, (folder / "torchrun.log").read_text()[-3000:]
    (run,) = set(folder.glob("logs/ppo_breakout/*")) - {stopped}  # written by rank 0 alone
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3]
    assert [r["env_steps"] for r in records] == [64, 128, 192]  # 2 ranks x 2 workers x 16 steps an update
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["update_0000003.pt"]  # the one at the end
    assert (run / "torchrun_job").read_text() != (stopped / "torchrun_job").read_text()


# under torchrun: one bad flag that every rank reads alike, two that are about the ranks' devices,
# the last on a machine with one GPU, as far as the checks of the flags go (no game starts)
BAD_INPUTS = [
    (["--batches", "3"], 0, "argument --batches: 3 does not divide"),
    (["--device-ids", "0"], 0, "argument --device-ids: 1 GPUs for 2 ranks on this machine"),
    (
        ["--device", "cuda", "--device-ids", "0,0", "--backend", "nccl"],
        1,
        "argument --backend: nccl cannot have ranks share a GPU (2 ranks on cuda:0); use auto or gloo",
    ),
]
ONE_GPU = """
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
"""


@pytest.mark.parametrize("args,gpus,problem", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_under_torchrun_is_one_line_from_rank_0_before_any_game_starts(tmp_path, args, gpus, problem):
    folder = copy_script(tmp_path)
    if gpus:
        patch_script(folder, ONE_GPU)
    job = torchrun(folder, *TINY_FLAGS, *args)
    assert job.wait(timeout=120) != 0
    log = (folder / "torchrun.log").read_text()
    ours = errors(log)
    assert len(ours) == 1 and problem in ours[0], log[-3000:]
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log  # torchrun's own is its report
    assert "exitcode  : 2 " in log, log[-3000:]  # every rank
    assert not (folder / "logs").exists(), "no run was started"


DEVICE_PROBLEMS = [
    (dict(device_ids="0,x"), 0, 2, "argument --device-ids: GPU numbers separated by commas, got '0,x'"),
    (dict(device_ids="0"), 0, 2, "argument --device-ids: 1 GPUs for 2 ranks on this machine"),
    (dict(device="cpu", device_ids="0,0"), 1, 2, "argument --device-ids: names GPUs, but the device is the CPU"),
    (dict(device="cpu", backend="nccl"), 0, 1, "argument --backend: nccl needs CUDA; use gloo on the CPU"),
]


@pytest.mark.parametrize("settings,local_rank,local_ranks,problem", DEVICE_PROBLEMS)
def test_a_rank_refuses_a_device_map_or_backend_that_does_not_fit(settings, local_rank, local_ranks, problem):
    import distributed
    import ppo_breakout as ppo

    with pytest.raises(ValueError) as refused:
        distributed.device_for(ppo.RunSettings(**settings), local_rank, local_ranks)
    assert str(refused.value) == problem


def test_each_local_rank_takes_its_own_gpu_or_the_one_the_map_names(monkeypatch):
    import distributed
    import ppo_breakout as ppo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [distributed.device_for(ppo.RunSettings(device="cuda"), r, 2) for r in (0, 1)] == ["cuda:0", "cuda:1"]
    shared = ppo.RunSettings(device="cuda", device_ids="0,0")
    assert [distributed.device_for(shared, r, 2) for r in (0, 1)] == ["cuda:0", "cuda:0"]
    with pytest.raises(ValueError, match="there is no GPU 5 \\(2 here\\)"):
        distributed.device_for(ppo.RunSettings(device="cuda", device_ids="5,0"), 0, 2)


BACKENDS = [
    ("auto", ["cuda:0", "cuda:1"], "nccl"),
    ("nccl", ["cuda:0", "cuda:1"], "nccl"),
    ("gloo", ["cuda:0", "cuda:1"], "gloo"),
    ("auto", ["cuda:0", "cuda:0"], "gloo"),  # --device-ids 0,0: NCCL would refuse them
    ("auto", ["cuda:0", "cuda:1", "cuda:0", "cuda:1"], "gloo"),  # 4 ranks on 2 GPUs, without --device-ids
    ("auto", ["cpu", "cpu"], "gloo"),
]


@pytest.mark.parametrize("backend,devices,expected", BACKENDS)
def test_the_gradients_go_over_nccl_only_where_each_rank_has_a_gpu_of_its_own(backend, devices, expected):
    import distributed
    import ppo_breakout as ppo

    assert distributed.backend_for(ppo.RunSettings(backend=backend), devices) == expected


def test_nccl_for_ranks_that_share_a_gpu_is_refused_as_bench_checks_before_it_starts_torchrun(monkeypatch):
    import distributed
    import ppo_breakout as ppo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    shared = ppo.RunSettings(device="cuda", device_ids="0,0", backend="nccl")
    with pytest.raises(ValueError) as refused:
        distributed.device_for(shared, 0, 2)
    assert (
        str(refused.value)
        == "argument --backend: nccl cannot have ranks share a GPU (2 ranks on cuda:0); use auto or gloo"
    )
    assert [distributed.device_for(dataclasses.replace(shared, backend="auto"), r, 2) for r in (0, 1)] == ["cuda:0"] * 2
