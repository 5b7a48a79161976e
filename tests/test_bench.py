import re

from conftest import ROOT, run_python


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
    line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"learn: run \w+, exit 0, steps 600, updates 3, wall \d+ s, steps/s \d+, "
        r"(score mean [\d.]+ sd [\d.]+ over the last \d+ games|no game finished yet)",
        line,
    ), line
