"""
Play whole games with a checkpoint's policy and print the score statistics; write the first game
as an MP4 video.

    python ppo_breakout.py evaluate logs/ppo_breakout/<run> [--episodes 30] [--video game.mp4] [--greedy]
    python ppo_breakout.py evaluate logs/ppo_breakout/<run> --sticky-actions 0.25   # Machado et al. 2018

The games follow the training protocol (all lives, unclipped score, 1 to 30 no-op frames at the
start), with sticky actions when asked. Game i (from 0) is seeded by the i-th word of
`SeedSequence([seed, 0]).generate_state(episodes)`; a word does not depend on how many are drawn,
so a longer evaluation starts with the games of a shorter one. The actions are sampled from one
generator, `torch.Generator().manual_seed(seed)`, through all the games in turn. Nothing is written
to the run folder.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

import ppo_breakout as ppo
import speed
from errors import Parser, device_problem, fail, seed_problem
from game import MAX_FRAMES, NOOP_MAX, Game
from run_files import CheckpointError, RunFileError, load_checkpoint, os_reason

# the agent the README's first result row trained (seed 1, the defaults, 10,240,000 env steps),
# exported from its last checkpoint with `python ppo_breakout.py export`; the notebook's
# `watch_shipped` plays it, beside the curve of the run that trained it
SHIPPED_AGENT = Path("models/breakout_10m.pt")
SHIPPED_CURVE = Path("docs/results/breakout_10m/curve.png")
VIDEO_FPS = 60  # the Atari's frame rate: the video plays at the game's own speed
# Machado et al. 2018 (arXiv:1709.06009): each frame, the emulator repeats the previous
# action instead of the new one with this probability; gymnasium's v5 Atari environments use it
MACHADO_STICKY_ACTIONS = 0.25
# the interquartile mean with a percentile bootstrap interval: what Agarwal et al. 2021
# (arXiv:2108.13264) and their rliable library report, robust to a few outlying games
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999  # scipy's default


def play_game(
    game: Game, choose_action: Callable[[np.ndarray], int], on_frame: Optional[Callable] = None
) -> dict:
    """Play one whole game from its start, `choose_action(obs)` picking each action from the frame
    stack, and return its info: {"reward": the score, "length": agent steps}. `on_frame`, when
    given, is called with every emulator frame of the game in colour, no-op start included."""
    over = False

    def this_game_only(frame):
        # the step that ends a game starts the next one before it returns: its no-ops and FIRE
        # are not this game's
        nonlocal over
        if not over:
            on_frame(frame)
            over = game.ale.game_over()

    game.on_frame = this_game_only if on_frame is not None else None
    try:
        obs, info = game.reset(), None
        while info is None:
            obs, _, _, info = game.step(choose_action(obs))
    finally:
        game.on_frame = None
    return info


def evaluate(
    checkpoint,
    episodes: int = 30,
    video: Optional[Path] = None,
    greedy: bool = False,
    seed: int = 10_000,
    device: str = "auto",
    sticky_actions: Optional[float] = None,
) -> Dict[str, list]:
    """Play `episodes` games, with sticky actions `sticky_actions` (by default those the policy
    trained with); Ctrl-C ends it early: the games finished by then are returned, with `stopped` True."""
    path, state = load_checkpoint(checkpoint)
    trained_sticky = float(state["configs"].get("sticky_actions", 0.0))  # 0 before it was a setting
    sticky_actions = trained_sticky if sticky_actions is None else sticky_actions
    game_name = state["configs"]["game"]
    model = ppo.Model(state["n_actions"])
    model.load_state_dict(state["model"])
    model = model.to(ppo.parse_device(device)).eval()
    seeds = [int(s) for s in np.random.SeedSequence([seed, 0]).generate_state(episodes)]
    generator = torch.Generator().manual_seed(seed)

    def choose_action(obs: np.ndarray) -> int:
        with torch.no_grad():
            pi, _ = model(torch.from_numpy(obs).unsqueeze(0).to(model.conv1.weight.device))
        probs = pi.probs.cpu()
        return int(probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator))

    scores, lengths, stopped, written = [], [], False, None
    # one thread: the forward pass of one frame stack is too small to share, and an idle second
    # thread spins on the core the emulator needs (docs/speed.md, "Evaluation")
    try:
        with speed.torch_threads(1):
            for i, game_seed in enumerate(seeds):
                game = Game(game_seed, game_name, clip_rewards=False, sticky_actions=sticky_actions)
                filmed = i == 0 and video is not None
                with video_file(video) if filmed else contextlib.nullcontext() as on_frame:
                    info = play_game(game, choose_action, on_frame)
                written = str(video) if filmed else written
                scores.append(info["reward"])
                lengths.append(info["length"])
                print(
                    f"game {i + 1:3d}/{episodes}  seed {game_seed:10d}  score {info['reward']:7.1f}  "
                    f"length {info['length']:6d}",
                    flush=True,
                )
    except KeyboardInterrupt:
        stopped = True
    return {
        "scores": scores,
        "lengths": lengths,
        "seeds": seeds,
        "checkpoint": str(path),
        "trained": (state["update"], state["env_steps"]),
        "sticky_actions": sticky_actions,
        "trained_sticky_actions": trained_sticky,
        "video": written,
        "stopped": stopped,
    }


@contextlib.contextmanager
def video_file(path: Path) -> Iterator[Callable[[np.ndarray], None]]:
    """`with video_file(path) as add: ...`: each frame given to `add` goes to ffmpeg at once, so
    memory stays the same however long the game. The MP4 is written beside `path` and renamed
    there on leaving the block, only if it holds every frame: a stopped or failed write leaves no
    file. Raises RunFileError when it does not."""
    import imageio.v2 as imageio
    import imageio_ffmpeg

    partial = path.with_name(f".{path.stem}.partial.mp4")
    added, ffmpeg_gone = 0, False
    try:
        # macro_block_size=1 keeps the game's own 160x210 instead of padding it to a multiple of 16
        with imageio.get_writer(
            partial, fps=VIDEO_FPS, codec="libx264", macro_block_size=1, ffmpeg_log_level="error"
        ) as writer:

            def add(frame: np.ndarray):
                nonlocal added, ffmpeg_gone
                added += 1
                if not ffmpeg_gone:
                    try:
                        writer.append_data(frame)
                    except OSError:
                        # ffmpeg has exited (a full disk): the game plays on, and the count below
                        # reports the cut video
                        ffmpeg_gone = True

            yield add
        # imageio does not look at ffmpeg's exit status: a full disk would leave a cut video
        # behind a success, so count what the file holds
        try:
            written = imageio_ffmpeg.count_frames_and_secs(str(partial))[0]
        except RuntimeError:
            written = 0
        if written != added:
            cut = f"ffmpeg wrote {written} of {added} frames (is the disk full?)"
            raise RunFileError(f"cannot write {path}: {cut}")
        os.replace(partial, path)
    except OSError as e:
        raise RunFileError(f"cannot write {path}: {os_reason(e)}") from e
    finally:
        partial.unlink(missing_ok=True)


def score_statistics(scores, seed: int) -> Dict[str, float]:
    """Mean, standard deviation (of the games, ddof 0), min, max, and the interquartile mean (the
    mean of the middle half) with its percentile bootstrap interval, which the bootstrap's own
    generator, seeded with `seed`, makes repeatable. From one game there is no interval: `iqm_low`
    and `iqm_high` are None."""
    import scipy.stats

    scores = np.asarray(scores, dtype=float)
    statistics = dict(
        mean=scores.mean(),
        std=scores.std(),
        min=scores.min(),
        max=scores.max(),
        iqm=scipy.stats.trim_mean(scores, 0.25),
        iqm_low=None,
        iqm_high=None,
    )
    if len(scores) > 1:  # scipy's bootstrap needs two
        interval = scipy.stats.bootstrap(
            (scores,),
            lambda sample, axis: scipy.stats.trim_mean(sample, 0.25, axis=axis),
            n_resamples=BOOTSTRAP_RESAMPLES,
            confidence_level=CONFIDENCE,
            method="percentile",
            random_state=np.random.default_rng(seed),  # `rng` from scipy 1.15 on; this name from 1.10
        ).confidence_interval
        statistics.update(iqm_low=interval.low, iqm_high=interval.high)
    return statistics


def protocol(sticky_actions: float, trained: float = 0.0) -> str:
    sticky = (
        f"sticky actions {sticky_actions:g} (repeat_action_probability, Machado et al. 2018)"
        if sticky_actions
        else "no sticky actions"
    )
    sticky += " (as in training)" if sticky_actions == trained else f" (trained with {trained:g})"
    return (
        f"all lives, unclipped score, 1 to {NOOP_MAX} no-op frames at the start, "
        f"at most {MAX_FRAMES:,} frames, {sticky}"
    )


def probability_problem(text: str) -> Optional[str]:
    try:
        p = float(text)
    except ValueError:
        return f"must be a number from 0 to 1, got {text!r}"
    return None if 0 <= p <= 1 else f"must be from 0 to 1, got {text}"  # a NaN fails too


def games(n: int) -> str:
    """A count of games, in agreement with it: "1 game", "30 games"."""
    return f"{n} game" if n == 1 else f"{n} games"


def main(argv: Optional[List[str]] = None) -> int:
    parser = Parser(
        prog="ppo_breakout.py evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Play whole games with a checkpoint's policy and print the score statistics.",
    )
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its newest checkpoint)")
    parser.add_argument("--episodes", type=int, default=30, help="whole games to play")
    parser.add_argument("--video", type=Path, default=None, help="write the first game to this MP4 file")
    parser.add_argument("--greedy", action="store_true", help="take the most probable action instead of sampling")
    parser.add_argument(
        "--seed",
        type=int,
        default=10_000,
        help="game i (from 0) is seeded by SeedSequence([SEED, 0]).generate_state(EPISODES)[i]; the action "
        "sampling, across the games, by torch.Generator().manual_seed(SEED); the bootstrap by SEED too",
    )
    parser.add_argument(
        "--sticky-actions",
        metavar="P",
        default=None,  # a string, read in main(), so that a bad value is one line like the others
        help="each frame, repeat the previous action instead of the new one with probability P "
        f"(ale-py's repeat_action_probability); {MACHADO_STICKY_ACTIONS} is Machado et al. 2018's protocol "
        "and gymnasium's v5 environments'; without it, the value the policy trained with (0 unless "
        "it trained with --sticky-actions)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.episodes <= 0:
        return fail(parser.prog, f"argument --episodes: must be a positive integer, got {args.episodes}")
    problem = seed_problem(args.seed)
    if problem:
        return fail(parser.prog, f"argument --seed: {problem}")
    problem = probability_problem(args.sticky_actions) if args.sticky_actions is not None else None
    if problem:
        return fail(parser.prog, f"argument --sticky-actions: {problem}")
    sticky_actions = float(args.sticky_actions) if args.sticky_actions is not None else None
    if args.video is not None and args.video.suffix.lower() != ".mp4":
        return fail(parser.prog, f"argument --video: {args.video} must end in .mp4")
    if args.video is not None and not args.video.resolve().parent.is_dir():
        return fail(parser.prog, f"argument --video: folder {args.video.parent} does not exist")
    problem = device_problem(args.device)
    if problem:
        return fail(parser.prog, f"argument --device: {problem}")
    try:
        result = evaluate(
            args.checkpoint, args.episodes, args.video, args.greedy, args.seed, args.device, sticky_actions
        )
    except CheckpointError as e:
        return fail(parser.prog, str(e))
    except RunFileError as e:  # the video could not be written
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    scores, lengths = result["scores"], np.array(result["lengths"])
    update, env_steps = result["trained"]
    print(f"checkpoint: {result['checkpoint']} (update {update:,}, {env_steps:,} env steps)")
    print(f"policy:     {'greedy' if args.greedy else 'sampled'}, seed {args.seed}")
    print(f"protocol:   {protocol(result['sticky_actions'], result['trained_sticky_actions'])}")
    if scores:
        s = score_statistics(scores, args.seed)
        print(
            f"score:      mean {s['mean']:.2f}  std {s['std']:.2f}  min {s['min']:.1f}  "
            f"max {s['max']:.1f}  over {games(len(scores))}"
        )
        interval = (
            f"{CONFIDENCE:.0%} CI [{s['iqm_low']:.2f}, {s['iqm_high']:.2f}] "
            f"(percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples)"
            if s["iqm_low"] is not None
            else "(no confidence interval from one game)"
        )
        print(f"IQM:        {s['iqm']:.2f}  {interval}")
        print(f"length:     mean {lengths.mean():.1f}  min {lengths.min()}  max {lengths.max()} agent steps")
    if result["video"]:
        print(f"video:      {result['video']} (game 1, {VIDEO_FPS} fps)")
    if result["stopped"]:
        no_video = "; no video was written" if args.video is not None and not result["video"] else ""
        stopped = f"stopped by Ctrl-C after {len(scores)} of {games(args.episodes)}{no_video}"
        print(f"{parser.prog}: {stopped}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
