import json
import re

from conftest import ROOT, run_python

import bench


def test_bench_prints_every_figure_for_one_configuration():
    result = run_python(
        ROOT,
        "bench.py",
        "--n-workers",
        "2",
        "--worker-steps",
        "16",
        "--epochs",
        "1",
        "--env-steps",
        "20",
        "--warmup",
        "0",
        "--measure",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for label in ("machine:", "software:", "config:", "rollout:", "update:", "loop:", "memory:"):
        assert label in out, label
    workers, vector, ratio = re.search(
        r"Workers\s+(\d+) steps/s \| AtariVectorEnv\s+(\d+) steps/s \| ratio ([\d.]+)", out
    ).groups()
    assert int(workers) > 0 and int(vector) > 0
    assert abs(float(ratio) - int(workers) / int(vector)) < 0.01
    assert "2 workers x 16 steps" in out


def test_random_policy_baseline_is_printed():
    result = run_python(ROOT, "bench.py", "--random-policy", "--episodes", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"random policy: game breakout, 2 games, score mean [\d.]+", result.stdout)


def test_learn_runs_the_real_entry_point_and_prints_one_stable_line(tmp_path):
    for name in ("bench.py", "ppo_breakout.py", ".labml.yaml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    result = run_python(
        tmp_path,
        "bench.py",
        "--learn",
        "--steps",
        "600",
        "--n-workers",
        "2",
        "--worker-steps",
        "100",
        "--epochs",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line, target = result.stdout.strip().splitlines()[-2:]
    assert target == "target: mean of 100 games never above 20.5", target  # 600 steps are not 100 games
    assert re.fullmatch(
        r"learn: run \w+, exit 0, steps 600, updates 3, wall \d+ s, steps/s \d+, "
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
