"""`python ppo_breakout.py evaluate` (evaluate.py) and `plot` (plots.py), on the shared short run."""

import errno
import json
import os
import re
import shutil
import sys

import imageio.v3 as iio
import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
import scipy.stats
import torch
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
import plots
import ppo_breakout
from evaluate import play_game
from plots import PLOT_DPI, PLOT_SIZE, mean_curve, plot_runs
from run_files import find_checkpoint


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


def test_evaluate_plays_with_the_sticky_actions_the_policy_trained_with_unless_told(short_run, tmp_path):
    # a checkpoint of a run trained with --sticky-actions 0.25
    state = torch.load(find_checkpoint(short_run), weights_only=True)
    state["configs"]["sticky_actions"] = 0.25
    torch.save(state, tmp_path / "update_0000004.pt")
    games = ["evaluate", str(tmp_path / "update_0000004.pt"), "--episodes", "5", "--seed", "7"]
    default, told = run(*games), run(*games, "--sticky-actions", "0")
    assert default.returncode == told.returncode == 0, default.stderr[-2000:] + told.stderr[-2000:]
    assert "sticky actions 0.25 (repeat_action_probability, Machado et al. 2018) (as in training)" in default.stdout
    assert "no sticky actions (trained with 0.25)" in told.stdout
    assert game_lines(default.stdout) != game_lines(told.stdout), "the emulator repeated actions in one"


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
    assert f"over {played} game{'s' if played > 1 else ''}\n" in stdout and f"video:      {video}" in stdout
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
    # what argparse itself finds wrong: its usage block before the error made these 4 or 5 lines
    (["evaluate", "{run}", "--episodes", "abc"], "argument --episodes: invalid int value: 'abc'"),
    (["evaluate", "{run}", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["evaluate", "{run}", "--episodes"], "argument --episodes: expected one argument"),
    (["evaluate", "{run}", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["evaluate"], "the following arguments are required: checkpoint"),
    (["plot", "{run}", "--baseline", "high"], "argument --baseline: invalid float value: 'high'"),
    (["plot", "{run}", "--max-steps", "1e6"], "argument --max-steps: invalid int value: '1e6'"),
    (["plot", "{run}", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["plot"], "the following arguments are required: RUN_FOLDER"),
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


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "missing.pt"],
        ["plot", "no/such/run"],
        ["evaluate", "missing.pt", "--episodes", "abc"],
        ["plot", "no/such/run", "--baseline", "high"],
    ],
)
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
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # and no temporary file beside it
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


def test_mean_curve_averages_the_runs_100_game_means_where_every_run_has_one():
    a = [{"env_steps": 1, "reward": 10.0}, {"env_steps": 2, "reward": 20.0}, {"env_steps": 3, "reward": 30.0}]
    b = [{"env_steps": 1}, {"env_steps": 2, "reward": 40.0}]  # no game ended by its first update
    assert mean_curve([a, b]) == ([2], [30.0])
    assert mean_curve([a]) == ([1, 2, 3], [10.0, 20.0, 30.0])


def test_plot_mean_draws_the_seeds_mean_as_a_black_line_between_them(tmp_path):
    # two seeds whose 100-game means hold at 10 and 30: their mean is a level black line at 20
    for name, score in (("a", 10.0), ("b", 30.0)):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"update": u, "env_steps": 100 * u, "reward": score}) for u in range(1, 21)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    without, with_mean = tmp_path / "without.png", tmp_path / "mean.png"
    assert run_main(cli.main, "plot", *runs, "-o", str(without)) == 0
    assert run_main(cli.main, "plot", *runs, "--mean", "-o", str(with_mean)) == 0

    def black_rows(path):  # rows of the score panel (the top half) black across half its width
        image = matplotlib.image.imread(path)[: PLOT_SIZE[1] * PLOT_DPI // 2, :, :3]
        return set(np.flatnonzero((image.sum(axis=-1) == 0).sum(axis=1) > image.shape[1] // 2))

    spines, drawn = black_rows(without), black_rows(with_mean)
    assert spines <= drawn  # the axes' top and bottom edges, in both
    added = drawn - spines
    assert added and min(spines) < min(added) and max(added) < max(spines), (sorted(spines), sorted(added))


def test_a_run_draws_its_own_curve_as_it_trains(short_run):
    assert (short_run / "curve.png").stat().st_size > 10_000


def run_copy(short_run, folder):
    """A run folder of the short run's metrics.jsonl and curve.png, for a test to spoil."""
    folder.mkdir()
    for name in ("metrics.jsonl", "curve.png"):
        shutil.copy(short_run / name, folder)
    return folder


@pytest.mark.parametrize("how", ["plot", "refresh_curve"])
def test_a_full_disk_leaves_the_old_curve_whole_and_no_partial_file(short_run, tmp_path, monkeypatch, capsys, how):
    # savefig wrote straight onto curve.png, so a full disk left it cut, or at 0 bytes
    run = run_copy(short_run, tmp_path / "run")
    before = (run / "curve.png").read_bytes()
    saves = []

    def full_disk_midway(figure, fname, *args, **kwargs):
        saves.append(fname)
        half = before[: len(before) // 2]
        if hasattr(fname, "write"):
            fname.write(half)
        else:
            with open(fname, "wb") as f:
                f.write(half)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk_midway)
    if how == "plot":
        assert run_main(cli.main, "plot", str(run)) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"ppo_breakout.py plot: error: cannot write {run / 'curve.png'}: No space left on device"
    else:
        plots.refresh_curve(run)  # what training calls at every checkpoint: it logs, and the run goes on
    assert len(saves) == 1  # the image was written, and failed half way
    assert (run / "curve.png").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["curve.png", "metrics.jsonl"]


def test_a_new_curve_is_on_the_disk_before_it_replaces_the_old_one(short_run, tmp_path, monkeypatch):
    run = run_copy(short_run, tmp_path / "run")
    (run / "curve.png").write_bytes(b"the old image")
    done = []
    fsync, replace = os.fsync, os.replace

    def spied_fsync(fd):
        done.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spied_replace(source, target):
        done.append(("replace", str(source), str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", spied_fsync)
    monkeypatch.setattr(os, "replace", spied_replace)
    plots.refresh_curve(run)
    (_, synced), (_, source, target) = [step for step in done if str(run) in step[1]]
    # the whole image, flushed, then renamed over the old one from beside it: never a cut curve.png
    assert synced == source and os.path.dirname(source) == str(run) and target == str(run / "curve.png")
    assert matplotlib.image.imread(run / "curve.png").shape[:2] == (PLOT_SIZE[1] * PLOT_DPI, PLOT_SIZE[0] * PLOT_DPI)
    assert sorted(p.name for p in run.iterdir()) == ["curve.png", "metrics.jsonl"]


def test_plot_says_in_one_line_that_it_skipped_a_cut_line_of_metrics(short_run, tmp_path, capsys):
    # a crash mid-write cuts the last line; plot drew the others, and said nothing of the one it left out
    run = tmp_path / "run"
    run.mkdir()
    lines = (short_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(lines) + lines[-1][:30])
    assert run_main(cli.main, "plot", str(run)) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"ppo_breakout.py plot: skipped 1 unreadable line of {metrics} (line {len(lines) + 1})"]
    assert out.strip() == f"wrote {run / 'curve.png'}"
    assert matplotlib.image.imread(run / "curve.png").shape[:2] == (PLOT_SIZE[1] * PLOT_DPI, PLOT_SIZE[0] * PLOT_DPI)
    # bench.py's read_metrics(folder) is as it was: the good records, and nothing said
    assert plots.read_metrics(run) == [json.loads(line) for line in lines]
    assert capsys.readouterr().err == ""


def test_skipped_lines_are_counted_and_named_in_one_message(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    good = json.dumps({"update": 1, "env_steps": 32, "games": []}).encode()
    # a blank line is no record lost; NULs are what a filesystem can leave after a power cut, and
    # bytes that are not UTF-8 made the whole file unreadable as text
    metrics.write_bytes(b"\n".join([good, b"{cut", good, b"", b"\0\0\0", good, b"\xff\xfe", b"7"]) + b"\n")
    said = []
    assert len(plots.read_metrics(tmp_path, said.append)) == 3
    assert said == [f"skipped 4 unreadable lines of {metrics} (lines 2, 5, 7, 8)"]
    metrics.write_bytes(b"{cut\n" * 7)
    with pytest.raises(plots.RunFileError) as error:
        plots.read_metrics(tmp_path, said.append)
    # one line, the error alone: no warning before it
    assert (
        str(error.value)
        == f"no metrics in {tmp_path}: skipped 7 unreadable lines of {metrics} (lines 1, 2, 3, 4, 5 and 2 more)"
    )
    assert len(said) == 1


@pytest.mark.parametrize(
    "episodes,stopped_in,score,stopped",
    [(1, None, "over 1 game", None), (2, 2, "over 1 game", "after 1 of 2 games"), (1, 1, None, "after 0 of 1 game")],
)
def test_evaluate_counts_games_in_the_right_number(
    short_run, monkeypatch, capsys, episodes, stopped_in, score, stopped
):
    # evaluate said "over 1 games", and "after 0 of 1 games"
    played = []

    def play(*args):
        if len(played) + 1 == stopped_in:
            raise KeyboardInterrupt  # Ctrl-C during this game
        played.append(play_game(*args))
        return played[-1]

    monkeypatch.setattr("evaluate.play_game", play)
    code = run_main(cli.main, "evaluate", str(short_run), "--episodes", str(episodes), "--seed", "7")
    out, err = capsys.readouterr()
    assert code == (130 if stopped else 0), err
    assert len(played) == (stopped_in - 1 if stopped else episodes)
    scores = [line.rsplit("  ", 1)[1] for line in out.splitlines() if line.startswith("score:")]
    assert scores == ([score] if score else []), out
    assert err.strip() == (f"ppo_breakout.py evaluate: stopped by Ctrl-C {stopped}" if stopped else "")
