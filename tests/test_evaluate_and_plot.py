"""`python ppo_breakout.py evaluate` (evaluate.py) and `plot` (plots.py), on the shared short run."""

import re
import sys

import imageio.v3 as iio
import matplotlib.image
import numpy as np
import pytest
import scipy.stats
from conftest import (
    ROOT,
    ctrl_c,
    files_of_at_most,
    read_until,
    run_main,
    run_python,
    start_in_own_session,
    wait_for,
)

import cli
import ppo_breakout
from evaluate import play_game
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


def game_lines(out: str) -> list:
    """(seed, score, length) of each `game i/n` line that evaluate printed."""
    pattern = r"game +\d+/\d+  seed +(\d+)  score +(-?[\d.]+)  length +(\d+)"
    return [(int(m[1]), float(m[2]), int(m[3])) for m in re.finditer(pattern, out)]


def test_game_i_is_seeded_as_the_help_says(short_run, evaluated, capsys):
    seeds = [seed for seed, _, _ in game_lines(evaluated[0].stdout)]
    # the i-th word of SeedSequence([seed, 0]).generate_state(episodes), which published results
    # used; not SeedSequence([seed, i]), as the docstring and README once said
    assert seeds == [int(s) for s in np.random.SeedSequence([7, 0]).generate_state(2)]
    assert seeds[1] != int(np.random.SeedSequence([7, 1]).generate_state(1)[0])
    assert run_main(cli.main, "evaluate", "--help") == 0
    assert "SeedSequence([SEED, 0]).generate_state(EPISODES)[i]" in " ".join(capsys.readouterr().out.split())


# runs the command given, then prints the peak resident memory (KiB) of the largest of its processes
PEAK_MEMORY = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
print("peak", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(done.returncode)
"""


def peak_memory_mb(*args) -> tuple:
    """(peak resident memory of `python ppo_breakout.py args...` in MiB, its stdout); ffmpeg,
    its child, counts alone, and holds less."""
    result = run_python(ROOT, "-c", PEAK_MEMORY, sys.executable, str(ROOT / "ppo_breakout.py"), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(re.search(r"^peak (\d+)$", result.stdout, re.M)[1]) / 2**10, result.stdout


def test_a_video_is_written_as_it_is_played_so_memory_does_not_grow_with_the_game(short_run, tmp_path):
    game = ["evaluate", str(short_run), "--episodes", "1", "--seed", "7"]
    without, out = peak_memory_mb(*game)
    with_video, _ = peak_memory_mb(*game, "--video", str(tmp_path / "game.mp4"))
    ((_, _, length),) = game_lines(out)
    # what keeping the game's frames would hold: 4 emulator frames of 210x160x3 bytes a step; a
    # Breakout game is at least ~117 steps (five balls missed), about 45 MiB, 4 times the bound
    held_mb = 4 * length * 210 * 160 * 3 / 2**20
    assert held_mb > 4 * 10
    assert (
        with_video - without < 10
    ), f"{with_video - without:.1f} MiB more with the video ({held_mb:.0f} MiB of frames)"
    assert iio.imread(tmp_path / "game.mp4").shape[0] > 4 * length  # the whole game is in it


def test_a_game_s_frames_are_its_own_not_the_next_game_s_start():
    game, rng = ppo_breakout.Game(3, clip_rewards=False), np.random.default_rng(0)
    frames = []
    play_game(game, lambda obs: int(rng.integers(len(game.actions))), frames.append)
    # Game.step starts the next game before it returns the ended one's info: of the frames the
    # emulator has played, the last getEpisodeFrameNumber() are the next game's no-ops and FIRE
    next_game_start = game.ale.getEpisodeFrameNumber()
    assert next_game_start > 0
    assert len(frames) == game.ale.getFrameNumber() - next_game_start


def test_ctrl_c_during_the_filmed_game_leaves_no_video_and_exits_130(short_run, tmp_path):
    video = tmp_path / "game.mp4"
    # with sticky actions 1 every action is the one before, NOOP from the reset on: the ball is
    # never launched and the game lasts its 108,000 frames, so the Ctrl-C lands inside it
    args = ["evaluate", str(short_run), "--episodes", "3", "--video", str(video), "--sticky-actions", "1"]
    process = start_in_own_session(tmp_path, str(ROOT / "ppo_breakout.py"), *args)
    partial = tmp_path / ".game.partial.mp4"
    stdout, stderr = ctrl_c(process, lambda: wait_for(partial.exists, 120, "ffmpeg to start writing the video"))
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip() == (
        "ppo_breakout.py evaluate: stopped by Ctrl-C after 0 of 3 games; no video was written"
    ), stderr[-2000:]
    assert "video:" not in stdout
    assert list(tmp_path.iterdir()) == []  # neither the video nor its partial file
    # and ffmpeg has exited: the no_process_left fixture fails the test otherwise


@pytest.fixture(scope="module")
def five_games(short_run):
    """`evaluate` of the short run, 5 games with seed 7, without sticky actions and with 0.25."""
    runs = {
        p: run("evaluate", str(short_run), "--episodes", "5", "--seed", "7", "--sticky-actions", p)
        for p in "0 0.25".split()
    }
    for result in runs.values():
        assert result.returncode == 0, result.stderr[-2000:]
    return {p: result.stdout for p, result in runs.items()}


def test_sticky_actions_reach_the_emulator_and_the_summary_names_them(five_games):
    plain, sticky = (game_lines(five_games[p]) for p in ("0", "0.25"))
    assert [seed for seed, _, _ in plain] == [seed for seed, _, _ in sticky]
    # the same games and the same action stream, yet different play: the emulator repeats actions
    # (a game whose paddle never meets the ball lasts as long either way, so all 5 are compared)
    assert [g[1:] for g in plain] != [g[1:] for g in sticky]
    assert "no sticky actions (as in training)" in five_games["0"]
    assert "sticky actions 0.25 (repeat_action_probability, Machado et al. 2018)" in five_games["0.25"]


def test_the_interquartile_mean_and_its_interval_are_scipy_s_on_the_printed_scores(five_games):
    out = five_games["0.25"]
    scores = np.array([score for _, score, _ in game_lines(out)])
    iqm, low, high = map(float, re.search(r"IQM: +(\S+)  95% CI \[(\S+), (\S+)\]", out).groups())
    # 5 games: trim_mean(0.25) cuts int(1.25) = 1 game from each end, the mean of the middle 3
    assert iqm == round(np.sort(scores)[1:-1].mean(), 2) == round(scipy.stats.trim_mean(scores, 0.25), 2)
    interval = scipy.stats.bootstrap(
        (scores,),
        lambda x, axis: scipy.stats.trim_mean(x, 0.25, axis=axis),
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(7),  # the evaluation's seed
    ).confidence_interval
    assert (low, high) == (round(interval.low, 2), round(interval.high, 2))
    assert low <= iqm <= high and low < high
    mean = re.search(r"score: +mean (\S+)  std (\S+)", out)
    assert (float(mean[1]), float(mean[2])) == (round(scores.mean(), 2), round(scores.std(), 2))


def test_one_game_has_an_interquartile_mean_but_says_it_has_no_interval(short_run, capsys):
    assert run_main(cli.main, "evaluate", str(short_run), "--episodes", "1", "--seed", "7") == 0
    out = capsys.readouterr().out
    ((_, score, _),) = game_lines(out)
    assert f"IQM:        {score:.2f}  (no confidence interval from one game)" in out.splitlines()


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
    (["evaluate", "{run}", "--sticky-actions", "1.5"], "--sticky-actions: must be from 0 to 1, got 1.5"),
    (["evaluate", "{run}", "--sticky-actions", "-0.1"], "--sticky-actions: must be from 0 to 1, got -0.1"),
    (["evaluate", "{run}", "--sticky-actions", "nan"], "--sticky-actions: must be from 0 to 1, got nan"),
    (["evaluate", "{run}", "--sticky-actions", "a lot"], "--sticky-actions: must be a number from 0 to 1, got 'a lot'"),
    (["plot", "{run}", "-o", "curve.txt"], "--output: curve.txt must end in .png, .pdf, .svg"),
    # without a suffix matplotlib would have written curve.png while we said "wrote curve"
    (["plot", "{run}", "-o", "curve"], "--output: curve must end in"),
]


@pytest.mark.parametrize("args,problem", BAD_PATHS)
def test_bad_paths_exit_2_with_one_line(short_run, tmp_path, monkeypatch, capsys, args, problem):
    # the entry point's own main(), called here: the command line below shows it is the script's
    args = [a.format(run=short_run, empty=tmp_path) for a in args]
    monkeypatch.chdir(tmp_path)
    assert run_main(cli.main, *args) == 2
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


@pytest.mark.parametrize("tool", ["evaluate", "plot"])
def test_help_states_each_default_once(tool, capsys):
    assert run_main(cli.main, tool, "--help") == 0
    # an option's entry runs from its flag at the line's start to the next one
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:")[1])
    for entry in entries:
        # plot's --output said "(default: curve.png in the first run folder) (default: None)"
        assert entry.count("default") <= 1, entry


def test_plot_writes_a_png_of_the_right_size(short_run, tmp_path, capsys):
    # `python ppo_breakout.py plot ...`, its main() called here
    output = tmp_path / "curve.png"
    args = ["plot", str(short_run), str(short_run), "-o", str(output), "--baseline", "1.2"]
    assert run_main(cli.main, *args) == 0
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
