"""
Learning curves from run folders' `metrics.jsonl`: the whole-game score (each game faint, the
100-game mean bold) against env steps, and the training statistics in small panels.

    python ppo_breakout.py plot logs/ppo_breakout/<run> [more runs] [-o curve.png] [--baseline 1.46]
    python ppo_breakout.py plot <seed 1's run> <seed 2's> <seed 3's> --mean -o seeds.png   # and their mean

A training run redraws `curve.png` in its own folder at every checkpoint, for a user without the
dashboard.
"""

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from errors import Parser, fail
from run_files import RunFileError, os_reason

PLOT_SIZE = (12, 9)  # inches; at PLOT_DPI, 1200x900 pixels
PLOT_DPI = 100
PLOT_PANELS = ["value_loss", "policy_reward", "entropy_bonus", "kl_div", "clip_fraction", "steps_per_second"]


def read_metrics(folder: Path, warn: Optional[Callable[[str], None]] = None) -> List[dict]:
    """The records of a run folder's metrics.jsonl. A line that holds none (one cut by a crash
    mid-write) is left out; `warn`, when given, is called with one line saying which were."""
    path = Path(folder) / "metrics.jsonl"
    records, skipped = [], []
    if path.is_file():
        # bytes: a crash can leave bytes that are not UTF-8, which would fail the whole file as text
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif line.strip():  # a blank line loses no record
                skipped.append(number)
    unreadable = skipped_lines(path, skipped) if skipped else None
    if not records:
        why = f": {unreadable}" if unreadable else " (expected a run folder with metrics.jsonl)"
        raise RunFileError(f"no metrics in {folder}{why}")
    if unreadable and warn is not None:
        warn(unreadable)
    return records


def skipped_lines(path: Path, numbers: List[int], named: int = 5) -> str:
    """The line that says which lines of `path` were left out, the first `named` of them by number:
    "skipped 2 unreadable lines of PATH (lines 3, 7)"."""
    lines = "line" if len(numbers) == 1 else "lines"
    which = ", ".join(map(str, numbers[:named])) + (f" and {len(numbers) - named} more" if len(numbers) > named else "")
    return f"skipped {len(numbers)} unreadable {lines} of {path} ({lines} {which})"


def plot_runs(
    folders: List[Path],
    output: Path,
    baseline: Optional[float] = None,
    labels: Optional[List[str]] = None,
    max_steps: Optional[int] = None,
    warn: Optional[Callable[[str], None]] = None,
    mean: bool = False,
):
    """One colour per run folder; `max_steps` cuts every run at that many env steps, so runs of
    different lengths compare over the same budget; `warn` is read_metrics'. `mean` also draws the
    mean of the runs' 100-game means (seeds of one configuration), over the env steps every run
    has reached. Returns the (label, records) it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(folder), read_metrics(folder, warn)) for folder in folders]
    if max_steps is not None:
        runs = [(folder, [r for r in records if r["env_steps"] <= max_steps]) for folder, records in runs]
    labels = labels or [folder.name[:12] for folder in folders]
    figure = plt.figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    grid = figure.add_gridspec(3, 3, height_ratios=[2, 1, 1])
    score_axes = figure.add_subplot(grid[0, :])
    panel_axes = [figure.add_subplot(grid[1 + i // 3, i % 3]) for i in range(len(PLOT_PANELS))]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    for (folder, records), label, colour in zip(runs, labels, colours):
        label = label if len(runs) > 1 else None
        game_steps = [r["env_steps"] for r in records for _ in r.get("games", [])]
        game_scores = [g[0] for r in records for g in r.get("games", [])]
        score_axes.scatter(game_steps, game_scores, s=6, alpha=0.3, color=colour, linewidths=0)
        with_mean = [r for r in records if "reward" in r]
        steps, means = [r["env_steps"] for r in with_mean], [r["reward"] for r in with_mean]
        score_axes.plot(steps, means, color=colour, linewidth=2, label=label)
        for axes, key in zip(panel_axes, PLOT_PANELS):
            points = [(r["env_steps"], r[key]) for r in records if key in r]
            if points:
                axes.plot(*zip(*points), color=colour, linewidth=1)
    if mean:
        steps, means = mean_curve([records for _, records in runs])
        score_axes.plot(steps, means, color="black", linewidth=2.5, label=f"mean of the {len(runs)} runs")
    if baseline is not None:
        score_axes.axhline(baseline, color="grey", linestyle="--", label=f"random policy ({baseline:.1f})")
    score_axes.set_ylabel("game score (whole game, unclipped)")
    score_axes.set_title("faint: each game; bold: mean of the last 100 games")
    if len(runs) > 1 or baseline is not None or mean:
        score_axes.legend(loc="upper left")
    for axes, key in zip(panel_axes, PLOT_PANELS):
        axes.set_title(key, fontsize=9)
        axes.tick_params(labelsize=7)
    for axes in [score_axes, *panel_axes[3:]]:
        axes.set_xlabel("env steps", fontsize=8)
    figure.tight_layout()
    try:
        save_whole(figure, Path(output))
    finally:
        plt.close(figure)
    return [(label, records) for label, (_, records) in zip(labels, runs)]


def mean_curve(runs: List[List[dict]]) -> Tuple[List[int], List[float]]:
    """The mean over runs of their 100-game means ("reward"), at each env step count where every
    run has one: seeds of one configuration share their updates' step counts."""
    curves = [{r["env_steps"]: r["reward"] for r in records if "reward" in r} for records in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    return steps, [sum(curve[s] for curve in curves) / len(curves) for s in steps]


def save_whole(figure, output: Path):
    """Write the image to a temporary file beside `output`, flush it to disk, then rename it over
    `output`: a full disk or a kill leaves the old image or the new one, never a cut one."""
    # a name of its own: `plot` and a training run's refresh_curve can write the same curve.png at once
    partial = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "xb") as f:
            # a file object has no name to take the format from: output's suffix, or matplotlib's default
            figure.savefig(f, format=output.suffix.lstrip(".").lower() or None, dpi=PLOT_DPI)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)  # a partial file would only fill the disk further


def refresh_curve(run: Path):
    """Redraw curve.png in a training run's folder; never fatal to the run."""
    try:
        plot_runs([run], run / "curve.png")
    except Exception as e:
        from labml import logger

        logger.log(f"curve.png not refreshed: {type(e).__name__}: {e}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = Parser(
        prog="ppo_breakout.py plot",
        # no ArgumentDefaultsHelpFormatter: every default here is None, "not given", which the
        # help says in words where it means something (--output's curve.png)
        description="Draw the learning curve and training statistics of one or more runs.",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="RUN_FOLDER", help="run folders to compare")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="image to write, .png, .pdf, .svg... (default: curve.png in the first run folder)",
    )
    parser.add_argument(
        "--baseline",
        type=float,
        default=None,
        help="draw a line at a random policy's mean score (bench.py --random-policy prints it)",
    )
    parser.add_argument(
        "--label", action="append", default=None, help="legend name of a run, once per RUN_FOLDER in order"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="plot each run up to this many env steps")
    parser.add_argument(
        "--mean",
        action="store_true",
        help="also draw the mean of the runs' 100-game means (seeds of one configuration), where all have reached",
    )
    args = parser.parse_args(argv)

    def warn(message: str):
        print(f"{parser.prog}: {message}", file=sys.stderr)

    for folder in args.folders:
        if not folder.is_dir():
            return fail(parser.prog, f"argument RUN_FOLDER: {folder} is not a folder")
    output = args.output or args.folders[0] / "curve.png"
    if not output.resolve().parent.is_dir():
        return fail(parser.prog, f"argument --output: folder {output.parent} does not exist")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if output.suffix.lower().lstrip(".") not in formats:
        # without a suffix matplotlib would write `output`.png, not the file we name
        return fail(
            parser.prog, f"argument --output: {output} must end in .png, .pdf, .svg or another of {sorted(formats)}"
        )
    if args.label is not None and len(args.label) != len(args.folders):
        return fail(parser.prog, f"argument --label: {len(args.label)} labels for {len(args.folders)} run folders")
    if args.max_steps is not None and args.max_steps <= 0:
        return fail(parser.prog, f"argument --max-steps: must be positive, got {args.max_steps}")
    try:
        plot_runs(args.folders, output, args.baseline, args.label, args.max_steps, warn, args.mean)
    except RunFileError as e:
        return fail(parser.prog, str(e))
    except OSError as e:
        print(f"{parser.prog}: error: cannot write {output}: {os_reason(e)}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
