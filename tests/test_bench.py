"""bench.py: the speed figures, a random policy's score, --learn: the real training run,
stopped however a user stops it, summarised in one line, and --ranks: the loop under torchrun with
1 rank and with N."""

import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TINY_FLAGS,
    assert_gone,
    checkpointed_last_update,
    children,
    copy_script,
    ctrl_c,
    descendants,
    hang_up_after_first_update,
    read_until,
    run_python,
    start_in_own_session,
    wait_for,
    wait_for_first_update,
)

import bench

# a learning run far longer than any test waits for: the tests stop it
LONG_LEARN = ("--learn", "--steps", "100000", *TINY_FLAGS)


def test_bench_prints_every_figure_for_one_configuration():
    args = [*TINY_FLAGS, "--env-steps", "20", "--warmup", "0", "--measure", "1", "--memory-updates", "1"]
    result = run_python(ROOT, "bench.py", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for label in ("machine:", "software:", "config:", "rollout:", "update:", "faults:", "loop:", "ceiling:", "memory:"):
        assert label in out, label
    workers, vector, ratio = re.search(
        r"Workers\s+(\d+) steps/s \| AtariVectorEnv\s+(\d+) steps/s \| ratio ([\d.]+)", out
    ).groups()
    assert int(workers) > 0 and int(vector) > 0
    assert abs(float(ratio) - int(workers) / int(vector)) < 0.01
    assert "2 workers x 16 steps, 2 minibatches, epochs 1" in out
    # the model computes in bf16 where the CPU does natively (AVX-512 bf16, AMX), else fp32: the
    # ceiling is at that dtype's matrix-product rate
    precision = "bf16" if "precision bf16 autocast" in out else "fp32"
    # the arithmetic bound: 32 samples x (1 epoch's training step + a rollout forward), plus the
    # 2 bootstrap forwards, at the matrix-product rate it measured
    ceiling, gflop, train, forward, rate = re.search(
        r"ceiling:\s+(\d+) env steps/s if an update's ([\d.]+) GFLOP \(([\d.]+) MFLOP a sample's training step "
        rf"x 1 epochs, ([\d.]+) its rollout forward\) ran at (\d+) GFLOP/s, this machine's {precision} matrix product",
        out,
    ).groups()
    assert (float(train), float(forward)) == (49.5, 18.7)
    assert float(gflop) == pytest.approx((32 * (49.5196 + 18.6911) + 2 * 18.6911) / 1e3, rel=0.01)
    assert int(ceiling) == pytest.approx(32 * int(rate) / float(gflop), rel=0.02)


def test_model_flops_are_the_nature_cnns_multiply_adds_counted_by_hand():
    import torch

    import ppo_breakout as ppo

    conv1 = 20 * 20 * 32 * (4 * 8 * 8)  # 84x84x4 -> 20x20x32, 8x8 kernels
    conv2 = 9 * 9 * 64 * (32 * 4 * 4)
    conv3 = 7 * 7 * 64 * (64 * 3 * 3)
    linear = 3136 * 512 + 512 * 4 + 512 * 1  # the shared layer, pi's logits over 4 actions, V
    forward, train_step = bench.model_flops(ppo.Model(4), torch.device("cpu"))
    assert forward == 2 * (conv1 + conv2 + conv3 + linear)
    # backward: every weight gradient, every input gradient but the frames'
    assert train_step == 3 * forward - 2 * conv1


def test_random_policy_baseline_is_printed():
    result = run_python(ROOT, "bench.py", "--random-policy", "--episodes", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"random policy: game breakout, 2 games, score mean [\d.]+", result.stdout)


def test_learn_runs_the_real_entry_point_and_prints_one_stable_line(tmp_path):
    copy_script(tmp_path, "bench.py")
    result = run_python(tmp_path, "bench.py", "--learn", "--steps", "96", *TINY_FLAGS, "--dashboard", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    line, target = result.stdout.strip().splitlines()[-2:]
    assert target == "target: mean of 100 games never above 20.5", target  # 96 steps are not 100 games
    assert re.fullmatch(
        r"learn: run \w+, exit 0, steps 96, updates 3, wall \d+ s, steps/s \d+, "
        r"(score mean [\d.]+ sd [\d.]+ over the last \d+ games|no game finished yet)",
        line,
    ), line


def test_summarise_says_when_the_100_game_mean_first_passed_the_target(tmp_path, capsys):
    # 10 updates of 1,000 steps, 20 s each, ending 30 games each: scores 0, 1, 2, ... in order
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for u in range(10):
            games = [[30 * u + i, 100] for i in range(30)]
            record = {"update": u + 1, "env_steps": 1000 * (u + 1), "time": 20.0 * u, "steps_per_second": 50.0}
            f.write(json.dumps({**record, "games": games}) + "\n")
    bench.summarise(tmp_path, target=150.0)
    learn, target = capsys.readouterr().out.splitlines()
    assert "steps 10000, updates 10, wall 200 s, steps/s 50, score mean 249.50" in learn
    # update 6 ends with games up to 179 (mean of the last 100: 129.5), update 7 up to 209 (159.5);
    # 140 s = the first update's own 20 s plus 120 s from its end to the end of update 7
    assert target == "target: mean of 100 games first above 150.0 at 7000 steps, 140 s"


def test_ctrl_c_during_a_benchmark_exits_130_in_one_line_and_leaves_no_process(tmp_path):
    copy_script(tmp_path, "bench.py")
    process = start_in_own_session(tmp_path, "bench.py", *TINY_FLAGS, "--env-steps", "1000000")
    workers = set()

    def workers_stepping():  # once the configuration is printed, the workers' million steps start
        read_until(process.stdout, lambda line: line.startswith("config:"), "the configuration")
        workers.update(descendants(process.pid))

    _, stderr = ctrl_c(process, workers_stepping)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == ["bench.py: stopped by Ctrl-C; the figures above were measured before it"]
    assert len(workers) == 2
    assert_gone(workers)


def test_ctrl_c_during_learn_keeps_the_training_checkpoint_and_summarises_it(tmp_path):
    copy_script(tmp_path, "bench.py")
    process = start_in_own_session(tmp_path, "bench.py", *LONG_LEARN)
    # Ctrl-C reaches bench.py, which passes it on to the training once
    stdout, stderr = ctrl_c(process, lambda: wait_for_first_update(tmp_path, process))
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    run, last_update = checkpointed_last_update(tmp_path)
    assert f"learn: run {run.name}, exit 130, steps {32 * last_update}, updates {last_update}," in stdout


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_sent_to_learn_alone_reaches_the_training_once(tmp_path, signum, code):
    # `kill -INT` or `kill -TERM` of bench.py's pid, not of its process group: before, SIGINT was
    # ignored and SIGTERM killed bench.py, leaving the training running on its own
    copy_script(tmp_path, "bench.py")
    process = start_in_own_session(tmp_path, "bench.py", *LONG_LEARN)
    groups = [process.pid]
    try:
        wait_for_first_update(tmp_path, process)
        (training,) = children(process.pid)
        training_and_workers = descendants(process.pid)
        groups.append(training)
        os.kill(process.pid, signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # it hangs: nothing of it may outlive the failed test
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            process.wait()
    assert process.returncode == code, stderr[-2000:]
    # once: the training ended its update with a checkpoint rather than stopping at once
    assert "again to stop at once" in stderr and "Stopped at once" not in stderr, stderr[-2000:]
    run, last_update = checkpointed_last_update(tmp_path)
    assert f"learn: run {run.name}, exit {code}, steps {32 * last_update}, updates {last_update}," in stdout
    assert len(training_and_workers) == 3
    assert_gone(training_and_workers)


def test_a_terminal_hang_up_during_learn_ends_the_training_with_a_checkpoint(tmp_path):
    copy_script(tmp_path, "bench.py")
    process, before_hang_up = hang_up_after_first_update(tmp_path, "bench.py", *LONG_LEARN)
    assert len(before_hang_up) == 3  # the training and its 2 workers
    assert process.returncode == 128 + signal.SIGHUP
    assert_gone(before_hang_up)
    checkpointed_last_update(tmp_path)


@pytest.mark.parametrize(
    "args,problem",
    [
        (["--learn", "--steps", "-3"], "argument --steps: must be positive"),
        (["--summarise", "no/such/run"], "argument --summarise: no metrics in no/such/run"),
        (["--seeds", "no/such/run"], "argument --seeds: no metrics in no/such/run"),
        (["--env-steps", "0"], "argument --env-steps: must be 1 or more, got 0"),
        (["--measure", "0"], "argument --measure: must be 1 or more"),
        (["--warmup", "-1"], "argument --warmup: must be 0 or more"),
        (["--memory-updates", "-2"], "argument --memory-updates: must be 0 or more"),
        (["--random-policy", "--episodes", "0"], "argument --episodes: must be 1 or more"),
        (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        (["--ranks", "1"], "argument --ranks: must be 2 or more, got 1"),
        (["--ranks", "0"], "argument --ranks: must be 2 or more, got 0"),
        (["--ranks", "2", "--device-ids", "0,0"], "argument --device-ids: --ranks chooses each run's GPUs itself"),
        (["--ranks", "2", "--device", "cpu", "--backend", "nccl"], "argument --backend: nccl needs CUDA; use gloo"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, monkeypatch, capsys, args, problem):
    # bench.py's main(), called here with its command line
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench.py", *args])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert exit.value.code == 2
    assert problem in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "logs").exists()


def test_learn_passes_bad_training_flags_to_the_training_which_refuses_them(tmp_path):
    copy_script(tmp_path, "bench.py")
    result = run_python(tmp_path, "bench.py", "--learn", "--steps", "1000", "--epochs", "0", "--dashboard", "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "ppo_breakout.py: error: argument --epochs: must be a positive integer, got 0", lines
    assert lines[-1].startswith("ppo_breakout.py: error: argument --dashboard: must be auto, off or an http"), lines
    assert "Traceback" not in result.stderr and not (tmp_path / "logs" / "ppo_breakout").exists()


def test_summarise_can_stop_at_a_step_count(tmp_path, capsys):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for u in range(4):
            record = {"update": u + 1, "env_steps": 100 * (u + 1), "time": float(u), "steps_per_second": 100.0}
            f.write(json.dumps({**record, "games": [[u, 10]]}) + "\n")
    bench.summarise(tmp_path, max_steps=250)
    assert "steps 200, updates 2, wall 2 s, steps/s 100, score mean 0.50 sd 0.50 over the last 2 games" in (
        capsys.readouterr().out
    )
    with pytest.raises(bench.RunFileError, match="within 50 env steps"):
        bench.summarise(tmp_path, max_steps=50)


def write_seed(folder: Path, scores_per_update, steps_per_update=100):
    """A run folder whose update u ends the games of scores_per_update[u]."""
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for u, scores in enumerate(scores_per_update):
            record = {"update": u + 1, "env_steps": steps_per_update * (u + 1), "time": float(u)}
            f.write(json.dumps({**record, "steps_per_second": 100.0, "games": [[s, 10] for s in scores]}) + "\n")
    return folder


def test_seeds_report_each_runs_last_100_games_and_their_mean_with_both_sds(tmp_path, capsys):
    # 3 updates of 100 steps; each ends 60 games. At 250 steps (update 2) the last 100 games are 40
    # of update 1 and 60 of update 2; at 300 steps those of updates 2 and 3
    a = write_seed(tmp_path / "a", [[0] * 60, [10] * 60, [20] * 60])  # at 250: (40*0 + 60*10)/100 = 6
    b = write_seed(tmp_path / "b", [[30] * 60, [30] * 60, [40] * 60])  # at 250: 30
    c = write_seed(tmp_path / "c", [[0] * 60, [0] * 60])  # stops at update 2: at 300 it is not there yet
    bench.seeds([a, b, c], (250, 300))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        "at 250: a 6.00 (update 2, 200 steps); b 30.00 (update 2, 200 steps); c 0.00 (update 2, 200 steps)"
    )
    # mean 12; population sd sqrt((36 + 324 + 144) / 3) = 12.96; sample sd sqrt(504 / 2) = 15.87
    assert lines[2] == "  mean of 3: 12.00 ± 12.96 (population sd), sample sd 15.87"
    # at 300: a (40*10 + 60*20)/100 = 16, b (40*30 + 60*40)/100 = 36; mean 26, sds 10 and 14.14
    assert lines[3] == (
        "at 300: a 16.00 (update 3, 300 steps); b 36.00 (update 3, 300 steps); c not there yet (update 2, 200 steps)"
    )
    assert lines[4] == "  mean of 2: 26.00 ± 10.00 (population sd), sample sd 14.14"


def test_seeds_default_to_cleanrls_10m_and_the_whole_run_from_the_command_line(tmp_path, monkeypatch, capsys):
    # update 9,765 of 1,024 steps is the last within 10,000,000; update 10,000 the whole run
    scores = [[] for _ in range(10_000)]
    scores[9_764], scores[9_999] = [100] * 100, [300] * 100
    a = write_seed(tmp_path / "a", scores, steps_per_update=1024)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--seeds", str(a), str(a)])
    bench.main()
    assert capsys.readouterr().out.splitlines()[1:] == [
        "at 10,000,000: a 100.00 (update 9,765, 9,999,360 steps); a 100.00 (update 9,765, 9,999,360 steps)",
        "  mean of 2: 100.00 ± 0.00 (population sd), sample sd 0.00",
        "at 10,240,000: a 300.00 (update 10,000, 10,240,000 steps); a 300.00 (update 10,000, 10,240,000 steps)",
        "  mean of 2: 300.00 ± 0.00 (population sd), sample sd 0.00",
    ]


# --ranks: a tiny comparison, 1 warm-up and 1 timed update for each run
RANKS = ("--ranks", "2", "--warmup", "1", "--measure", "1", *TINY_FLAGS)


@pytest.fixture
def temporary(tmp_path, monkeypatch):
    """The folder where bench.py (and the torchrun it starts) makes its temporary folders."""
    folder = tmp_path / "temporary"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def test_ranks_measures_the_loop_with_1_rank_and_with_2_side_by_side(tmp_path, temporary):
    copy_script(tmp_path, "bench.py")
    result = run_python(tmp_path, "bench.py", *RANKS)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["machine", "config", "ranks", "in update"], lines
    assert lines[0] == f"machine:   {bench.machine()}"
    assert "breakout, 2 workers x 16 steps per rank, 2 minibatches, epochs 1, device cpu, precision " in lines[1]
    for line in lines[2:]:
        one, two, ratio = re.search(
            r"1 rank\s+(\d+) env steps/s \| 2 ranks\s+(\d+) env steps/s \| ratio ([\d.]+), ", line
        ).groups()
        assert int(one) > 0 and int(two) > 0, line
        # the ratio of the unrounded figures: within what rounding them to whole numbers allows
        one, two, ratio = int(one), int(two), float(ratio)
        assert (two - 0.5) / (one + 0.5) - 0.005 <= ratio <= (two + 0.5) / (one - 0.5) + 0.005, line
    assert lines[2].endswith("over 1 updates after 1 warm-up")
    # each run in a temporary folder of its own, torchrun's files too: all gone, none here
    assert list(temporary.iterdir()) == [], result.stderr[-2000:]
    assert not (tmp_path / "logs").exists()


def test_loop_rate_is_the_measured_updates_steps_over_their_wall_time():
    records = [
        {"env_steps": 64, "time": 10.0, "steps_per_second": 32.0},  # warm-up: 2 s
        {"env_steps": 128, "time": 11.0, "steps_per_second": 128.0},  # 0.5 s, and 0.5 s between updates
        {"env_steps": 192, "time": 12.0, "steps_per_second": 64.0},  # 1 s
    ]
    assert bench.loop_rate(records, 1) == 64.0  # 128 steps in 2 s of the clock
    assert bench.update_rate(records, 1) == 128 / 1.5  # 128 steps in 0.5 + 1 s of updates
    assert bench.loop_rate(records, 0) == bench.update_rate(records, 0) == 192 / 3.5


def test_device_ids_put_2_ranks_on_one_gpu_only_where_there_are_fewer_gpus():
    import torch

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert bench.device_ids(cuda, 2, 1) == "0,0"
    assert bench.device_ids(cuda, 1, 1) == ""  # rank 0 on GPU 0, distributed.py's default
    assert bench.device_ids(cuda, 2, 2) == ""
    assert bench.device_ids(torch.device("cuda:1"), 2, 2) == "1,1"  # the GPU named
    assert bench.device_ids(cpu, 2, 0) == ""


def test_training_flags_give_the_same_configuration_to_ppo_breakout():
    import cli
    import ppo_breakout as ppo

    argv = [*TINY_FLAGS, "--no-channels-last", "--learning-rate", "0.00025", "--updates", "7", "--device-ids", "0"]
    given = vars(cli.build_parser().parse_args(argv))
    c, r = ppo.settings_from(ppo.Configs, given), ppo.settings_from(ppo.RunSettings, given)
    flags = bench.training_flags(c, r)
    assert "--updates" not in flags and "--device-ids" not in flags  # compare_ranks sets them
    again = vars(cli.build_parser().parse_args([*flags, "--updates", "7", "--device-ids", "0"]))
    assert ppo.settings_from(ppo.Configs, again) == c and ppo.settings_from(ppo.RunSettings, again) == r
    assert not r.channels_last and c.learning_rate == 0.00025


def test_a_failed_run_under_ranks_is_one_line_naming_it_and_exit_1(tmp_path, temporary):
    # distributed.py that fails at once, as a rank that cannot start does
    copy_script(tmp_path, "bench.py")
    with open(tmp_path / "distributed.py", "a") as f:
        f.write(
            "\n\n_main = main\n\n\ndef main(argv):\n"
            "    if os.environ['WORLD_SIZE'] == '1':\n"
            "        print('ppo_breakout.py: error: planted failure', file=sys.stderr)\n"
            "        return 3\n"
            "    return _main(argv)\n"
        )
    result = run_python(tmp_path, "bench.py", *RANKS)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "bench.py: error: the 1-rank run failed with exit 1: ppo_breakout.py: error: planted failure"
    ]
    assert "ranks:" not in result.stdout
    assert list(temporary.iterdir()) == []


def test_ctrl_c_during_ranks_stops_the_torchrun_run_and_leaves_no_process(tmp_path, temporary):
    copy_script(tmp_path, "bench.py")
    process = start_in_own_session(
        tmp_path, "bench.py", "--ranks", "2", "--measure", "100000", *TINY_FLAGS, env={"TMPDIR": str(temporary)}
    )
    job = set()

    def first_update():  # the 1-rank run has written its first update
        wait_for(lambda: list(temporary.glob("*/logs/ppo_breakout/*/metrics.jsonl")), 120, "the first update")
        job.update(descendants(process.pid))

    _, stderr = ctrl_c(process, first_update)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == ["bench.py: stopped by Ctrl-C during the 1-rank run"]
    assert len(job) == 4  # torchrun, its rank and the rank's 2 game workers
    assert_gone(job)
    assert list(temporary.iterdir()) == []


def busy_loops_running() -> list:
    """The pids of every process on this machine running bench.py's busy loop."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if bench.BUSY_LOOP in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
    return found


def test_busy_measures_the_loop_quiet_and_beside_busy_processes_in_turns_and_leaves_none():
    result = run_python(ROOT, "bench.py", *TINY_FLAGS, "--busy", "2", "--warmup", "0", "--measure", "1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = r"^(quiet|beside 2 busy processes): +(\d+) env steps/s over 1 updates\n"
    line += r" +an update: sampling ([\d.]+) s, training ([\d.]+) s$"
    phases = re.findall(line, result.stdout, re.M)
    assert [phase for phase, *_ in phases] == ["quiet", "beside 2 busy processes"] * 2, result.stdout
    for _, rate, sampling, training in phases:  # the update's 32 env steps over its two parts' seconds
        seconds = float(sampling) + float(training)  # each printed to within 0.005 s
        assert 32 / (seconds + 0.01) - 0.5 <= float(rate) <= 32 / max(seconds - 0.01, 1e-3) + 0.5
    (share,) = re.findall(r"^busy core: ([\d.]+) of the quiet speed beside 2 one-thread busy", result.stdout, re.M)
    quiet = [float(rate) for phase, rate, *_ in phases if phase == "quiet"]
    busy = [float(rate) for phase, rate, *_ in phases if phase != "quiet"]
    assert float(share) == pytest.approx(sum(busy) / sum(quiet), abs=0.01)
    assert busy_loops_running() == [], "the busy processes were killed"
