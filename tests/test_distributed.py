"""The experiment under torchrun: real ranks over gloo on the CPU, real game workers."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, TINY_FLAGS, checkpointed_last_update, copy_script, descendants, metrics_files, wait_for

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(folder: Path, *args, restarts: int = 0) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 ppo_breakout.py args...` in `folder`, in a session
    of its own; its output goes to folder/torchrun.log."""
    return subprocess.Popen(
        [*TORCHRUN, f"--max-restarts={restarts}", "ppo_breakout.py", "--dashboard", "off", *args],
        cwd=folder,
        stdout=open(folder / "torchrun.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


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
        trainer = ppo.Trainer(partner=ranks, **dict({TINY!r}, worker_steps=200, batches=4))
        torch.manual_seed(ranks.rank)  # each rank its own actions, as distributed.main does
        used = [trainer.train(trainer.sample())["clip_range"]]
        if ranks.rank == 0:
            ranks.live["clip_range"].set_value(0.2)  # what labml does with a change from the dashboard
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
        dynamic = dict(clip_range=0.1, value_loss_coef=0.5, entropy_bonus_coef=0.01)
        half = {{k: v[32 * ranks.rank : 32 * (ranks.rank + 1)] for k, v in batch.items()}}
        with ppo.Trainer(partner=ranks, **config) as shared:
            shared._train_step(half, **dynamic)
            weights = torch.cat([p.detach().flatten() for p in shared.model.parameters()])
        if ranks.rank == 0:
            with ppo.Trainer(**config) as alone:  # the same initial weights, from the same seed
                alone._train_step(batch, **dynamic)
                expected = torch.cat([p.detach().flatten() for p in alone.model.parameters()])
            print("max difference", (weights - expected).abs().max().item())
            assert torch.allclose(weights, expected, rtol=1e-4, atol=1e-6)
            print("ok")
        ranks.close()
        """,
    )
    assert out.strip().endswith("ok")


@pytest.mark.parametrize("worker", [False, True], ids=["the rank", "a game worker of the rank"])
def test_a_killed_rank_ends_the_job_within_60_s_naming_it_and_leaves_no_process(tmp_path, worker):
    folder = copy_script(tmp_path)
    job = torchrun(folder, "--updates", "100000", *TINY_FLAGS)
    try:
        wait_for(lambda: metrics_files(folder), 120, "the first update")
        killed = rank_pid(job.pid, 1, worker)
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
    # a race between rank 1's end and rank 0's lost collective, so the blocks are read, not their order
    blocks = re.split(r"\n\[\d+\]:\n", log.split("Failures:", 1)[-1])
    (rank_1,) = [block for block in blocks if "rank      : 1 (local_rank: 1)" in block]
    if worker:  # the rank named the worker that died, and ended
        assert re.search(rf"error: rank 1: worker \d \(pid {killed}\) died: killed by signal SIGKILL", log), log[-3000:]
        assert "exitcode  : 1 " in rank_1, log[-3000:]
    else:
        assert f"Signal 9 (SIGKILL) received by PID {killed}" in rank_1, log[-3000:]


def test_under_max_restarts_a_killed_rank_is_restarted_and_the_job_goes_on_from_its_checkpoint(tmp_path):
    folder = copy_script(tmp_path)
    job = torchrun(folder, "--updates", "8", "--checkpoint-every", "2", *TINY_FLAGS, restarts=1)
    try:
        first = wait_for(lambda: metrics_files(folder), 120, "the first update")[0]
        wait_for(lambda: len(first.read_text().splitlines()) >= 3, 120, "3 updates")
        os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
        assert job.wait(timeout=300) == 0, (folder / "torchrun.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    runs = sorted(folder.glob("logs/ppo_breakout/*"), key=lambda run: (run / "metrics.jsonl").stat().st_mtime)
    assert len(runs) == 2 and len({(run / "torchrun_job").read_text() for run in runs}) == 1
    resumed = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    # it went on from the newest checkpoint (one every 2 updates), losing only the updates after it
    assert (resumed[0]["update"] - 1) % 2 == 0 and resumed[0]["update"] > 2 and resumed[-1]["update"] == 8
    assert (runs[1] / "checkpoints" / "update_0000008.pt").exists()


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


# under torchrun: one bad flag that every rank reads alike, one that is about the ranks' devices
BAD_INPUTS = [
    (["--batches", "3"], "argument --batches: 3 does not divide"),
    (["--device-ids", "0"], "argument --device-ids: 1 GPUs for 2 ranks on this machine"),
]


@pytest.mark.parametrize("args,problem", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_under_torchrun_is_one_line_from_rank_0_before_any_game_starts(tmp_path, args, problem):
    folder = copy_script(tmp_path)
    job = torchrun(folder, *TINY_FLAGS, *args)
    assert job.wait(timeout=120) != 0
    log = (folder / "torchrun.log").read_text()
    ours = [line for line in log.splitlines() if line.startswith("ppo_breakout.py: error:")]
    assert len(ours) == 1 and problem in ours[0], log[-3000:]
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log  # torchrun's own is its report
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
