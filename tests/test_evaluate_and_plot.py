"""`python ppo_breakout.py evaluate` (evaluate.py) and `plot` (plots.py), on the shared short run."""

import re

import imageio.v3 as iio
import matplotlib.image
import numpy as np
import pytest
from conftest import ROOT, ctrl_c, files_of_at_most, read_until, run_main, run_python, start_in_own_session

import ppo_breakout
from plots import PLOT_DPI, PLOT_SIZE, plot_runs


def run(*args, cwd=ROOT, timeout=300, preexec_fn=None):
    return run_python(cwd, str(ROOT / "ppo_breakout.py"), *args, timeout=timeout, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def evaluated(short_run, tmp_path_factory):
    """`evaluate` of the short run: 2 games, seed 7, the first written as a video."""
    before = sorted(p.name for p in short_run.rglob("*"))
    video = tmp_path_factory.mktemp("evaluate") / "game.mp4"
    result = run("evaluate", str(short_run), "--episodes", "2", "--video", str(video), "--seed", "7")
    assert result.returncode == 0, result.stderr[-2000:]
    return result, video, before


def test_evaluate_prints_the_statistics_and_writes_a_video_of_the_game(short_run, evaluated):
    result, video, before = evaluated
    out = result.stdout
    for word in ("mean", "std", "min", "max", "length", "seed"):
        assert word in out
    games = [line for line in out.splitlines() if line.startswith("game ")]
    assert len(games) == 2
    frames = iio.imread(video)
    assert frames.ndim == 4 and frames.shape[1:] == (210, 160, 3)
    assert frames.shape[0] > 100  # every emulator frame of a whole game
    assert frames.std() > 0
    # evaluation never touches the run it came from
    assert sorted(p.name for p in short_run.rglob("*")) == before


def test_evaluate_is_repeatable_with_its_seed(short_run, evaluated):
    again = run("evaluate", str(short_run), "--episodes", "1", "--seed", "7")
    first_game = [line for line in evaluated[0].stdout.splitlines() if line.startswith("game ")][0]
    assert again.stdout.splitlines()[0] == first_game.replace("/2 ", "/1 ")


def test_ctrl_c_during_evaluate_prints_the_games_played_so_far_and_exits_130(short_run, tmp_path):
    video = tmp_path / "game.mp4"
    args = ["evaluate", str(short_run), "--episodes", "1000", "--video", str(video)]
    process = start_in_own_session(tmp_path, str(ROOT / "ppo_breakout.py"), *args)
    lines = []
    # once the first game, and its video, are done
    stdout, stderr = ctrl_c(process, lambda: lines.extend(read_until(process.stdout, bool, "the first game")))
    first = lines[0]
    assert first.startswith("game   1/1000"), first + stderr[-2000:]
    assert process.returncode == 130, stderr[-2000:]
    (line,) = stderr.strip().splitlines()
    played = int(re.fullmatch(r"ppo_breakout.py evaluate: stopped by Ctrl-C after (\d+) of 1000 games", line)[1])
    assert 1 <= played < 1000
    assert f"over {played} games" in stdout and f"video:      {video}" in stdout
    assert iio.imread(video).shape[1:] == (210, 160, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["game.mp4"]  # no partial file beside it


BAD_PATHS = [
    (["evaluate", "missing/checkpoint.pt"], "checkpoint not found"),
    (["evaluate", "{run}", "--video", "no/such/folder/game.mp4"], "does not exist"),
    (["evaluate", "{run}", "--video", "game.avi"], "must end in .mp4"),
    (["evaluate", "{run}", "--episodes", "0"], "--episodes"),
    (["evaluate", "{run}", "--seed", "-1"], "--seed: must be 0 or more"),
    (["plot", "{empty}"], "no metrics in"),
    (["plot", "no/such/run"], "no/such/run is not a folder"),
    (["plot", "{run}", "-o", "no/such/folder/curve.png"], "does not exist"),
    (["plot", "{run}", "{run}", "--label", "only one"], "1 labels for 2 run folders"),
    (["plot", "{run}", "--max-steps", "0"], "--max-steps"),
    (["evaluate", "{run}", "--seed", str(2**64)], "--seed: must be less than 2**64"),
    (["plot", "{run}", "-o", "curve.txt"], "--output: curve.txt must end in .png, .pdf, .svg"),
    # without a suffix matplotlib would have written curve.png while we said "wrote curve"
    (["plot", "{run}", "-o", "curve"], "--output: curve must end in"),
]


@pytest.mark.parametrize("args,problem", BAD_PATHS)
def test_bad_paths_exit_2_with_one_line(short_run, tmp_path, monkeypatch, capsys, args, problem):
    # the entry point's own main(), called here: the command line below shows it is the script's
    args = [a.format(run=short_run, empty=tmp_path) for a in args]
    monkeypatch.chdir(tmp_path)
    assert run_main(ppo_breakout.main, *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], lines
    assert lines[0].startswith(f"ppo_breakout.py {args[0]}: error: "), lines


@pytest.mark.parametrize("args", [["evaluate", "missing.pt"], ["plot", "no/such/run"]])
def test_a_bad_path_on_the_command_line_is_one_line_and_exit_2(tmp_path, args):
    result = run(*args, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"ppo_breakout.py {args[0]}: error: "), line


def test_a_video_or_plot_that_cannot_be_written_is_an_error_not_a_cut_file(short_run, tmp_path):
    # files of at most 10 KiB, as on a full disk: imageio ignored ffmpeg's failure, so a cut video
    # was reported as written, and savefig's OSError was a traceback
    video, curve = tmp_path / "game.mp4", tmp_path / "curve.png"
    limit = files_of_at_most(10 * 2**10)
    evaluate = run("evaluate", str(short_run), "--episodes", "1", "--video", str(video), cwd=tmp_path, preexec_fn=limit)
    plot = run("plot", str(short_run), "-o", str(curve), cwd=tmp_path, preexec_fn=limit)
    assert (evaluate.returncode, plot.returncode) == (1, 1), evaluate.stderr[-2000:] + plot.stderr[-2000:]
    assert re.fullmatch(
        rf"ppo_breakout.py evaluate: error: cannot write {re.escape(str(video))}: "
        r"ffmpeg wrote \d+ of \d+ frames \(is the disk full\?\)",
        evaluate.stderr.strip(),
    ), evaluate.stderr
    assert plot.stderr.strip() == f"ppo_breakout.py plot: error: cannot write {curve}: File too large"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no cut or partial file is left behind"


def test_plot_writes_a_png_of_the_right_size(short_run, tmp_path, capsys):
    # `python ppo_breakout.py plot ...`, its main() called here
    output = tmp_path / "curve.png"
    args = ["plot", str(short_run), str(short_run), "-o", str(output), "--baseline", "1.2"]
    assert run_main(ppo_breakout.main, *args) == 0
    assert capsys.readouterr().out.strip() == f"wrote {output}"
    image = matplotlib.image.imread(output)
    assert image.shape[:2] == (PLOT_SIZE[1] * PLOT_DPI, PLOT_SIZE[0] * PLOT_DPI)
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10  # something was drawn


def test_plot_cuts_runs_at_max_steps_and_names_them_by_label(short_run, tmp_path):
    # the short run has 4 updates of 2 x 16 steps: 32, 64, 96 and 128 env steps
    drawn = plot_runs([short_run, short_run], tmp_path / "c.png", labels=["fast", "plain"], max_steps=70)
    assert [label for label, _ in drawn] == ["fast", "plain"]
    assert [[r["env_steps"] for r in records] for _, records in drawn] == [[32, 64], [32, 64]]
    everything = plot_runs([short_run], tmp_path / "d.png")
    assert [r["env_steps"] for r in everything[0][1]] == [32, 64, 96, 128]


def test_a_run_draws_its_own_curve_as_it_trains(short_run):
    assert (short_run / "curve.png").stat().st_size > 10_000
