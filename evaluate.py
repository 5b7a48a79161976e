"""
Play whole games with a checkpoint's policy and print the score statistics; write the first game
as an MP4 video.

    python ppo_breakout.py evaluate logs/ppo_breakout/<run> [--episodes 30] [--video game.mp4] [--greedy]

The games follow the training protocol (all lives, unclipped score, up to 30 no-op starts); game
i is seeded by SeedSequence([seed, i]). Nothing is written to the run folder.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

import cli
import ppo_breakout as ppo
from run_files import CheckpointError, RunFileError, load_checkpoint, os_reason

VIDEO_FPS = 60  # the Atari's frame rate: the video plays at the game's own speed


def evaluate(
    checkpoint,
    episodes: int = 30,
    video: Optional[Path] = None,
    greedy: bool = False,
    seed: int = 10_000,
    device: str = "auto",
) -> Dict[str, list]:
    """Play `episodes` games; Ctrl-C ends it early: the games finished by then are returned, with
    `stopped` True."""
    path, state = load_checkpoint(checkpoint)
    game_name = state["configs"]["game"]
    model = ppo.Model(state["n_actions"])
    model.load_state_dict(state["model"])
    model = model.to(ppo.parse_device(device)).eval()
    seeds = [int(s) for s in np.random.SeedSequence([seed, 0]).generate_state(episodes)]
    generator = torch.Generator().manual_seed(seed)
    scores, lengths, stopped, written = [], [], False, None
    try:
        for i, game_seed in enumerate(seeds):
            game = ppo.Game(game_seed, game_name, clip_rewards=False)
            if i == 0 and video is not None:
                frames = []
                game.on_frame = frames.append
            obs, info = game.reset(), None
            while info is None:
                with torch.no_grad():
                    pi, _ = model(torch.from_numpy(obs).unsqueeze(0).to(model.conv1.weight.device))
                probs = pi.probs.cpu()
                action = probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator)
                obs, _, _, info = game.step(int(action))
            if i == 0 and video is not None:
                write_video(video, frames)
                written, game.on_frame = str(video), None
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
        "video": written,
        "stopped": stopped,
    }


def write_video(path: Path, frames: List[np.ndarray]):
    """Write the MP4 beside `path` and rename it there, so a stopped write leaves no broken file."""
    import imageio.v2 as imageio
    import imageio_ffmpeg

    partial = path.with_name(f".{path.stem}.partial.mp4")
    try:
        # macro_block_size=1 keeps the game's own 160x210 instead of padding it to a multiple of 16
        with imageio.get_writer(
            partial, fps=VIDEO_FPS, codec="libx264", macro_block_size=1, ffmpeg_log_level="error"
        ) as writer:
            for frame in frames:
                writer.append_data(frame)
        # imageio does not look at ffmpeg's exit status: a full disk would leave a cut video
        # behind a success, so count what the file holds
        try:
            written = imageio_ffmpeg.count_frames_and_secs(str(partial))[0]
        except RuntimeError:
            written = 0
        if written != len(frames):
            cut = f"ffmpeg wrote {written} of {len(frames)} frames (is the disk full?)"
            raise RunFileError(f"cannot write {path}: {cut}")
        os.replace(partial, path)
    except OSError as e:
        raise RunFileError(f"cannot write {path}: {os_reason(e)}") from e
    finally:
        partial.unlink(missing_ok=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ppo_breakout.py evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Play whole games with a checkpoint's policy and print the score statistics.",
    )
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its newest checkpoint)")
    parser.add_argument("--episodes", type=int, default=30, help="whole games to play")
    parser.add_argument("--video", type=Path, default=None, help="write the first game to this MP4 file")
    parser.add_argument("--greedy", action="store_true", help="take the most probable action instead of sampling")
    parser.add_argument("--seed", type=int, default=10_000, help="seeds the games and the action sampling")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.episodes <= 0:
        return cli.fail(parser.prog, f"argument --episodes: must be a positive integer, got {args.episodes}")
    problem = cli.seed_problem(args.seed)
    if problem:
        return cli.fail(parser.prog, f"argument --seed: {problem}")
    if args.video is not None and args.video.suffix.lower() != ".mp4":
        return cli.fail(parser.prog, f"argument --video: {args.video} must end in .mp4")
    if args.video is not None and not args.video.resolve().parent.is_dir():
        return cli.fail(parser.prog, f"argument --video: folder {args.video.parent} does not exist")
    problem = cli.device_problem(args.device)
    if problem:
        return cli.fail(parser.prog, f"argument --device: {problem}")
    try:
        result = evaluate(args.checkpoint, args.episodes, args.video, args.greedy, args.seed, args.device)
    except CheckpointError as e:
        return cli.fail(parser.prog, str(e))
    except RunFileError as e:  # the video could not be written
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    scores, lengths = np.array(result["scores"]), np.array(result["lengths"])
    print(f"checkpoint: {result['checkpoint']}")
    print(f"policy:     {'greedy' if args.greedy else 'sampled'}, seed {args.seed}")
    if len(scores):
        print(
            f"score:      mean {scores.mean():.2f}  std {scores.std():.2f}  min {scores.min():.1f}  "
            f"max {scores.max():.1f}  over {len(scores)} games"
        )
        print(f"length:     mean {lengths.mean():.1f}  min {lengths.min()}  max {lengths.max()} agent steps")
    if result["video"]:
        print(f"video:      {result['video']} (game 1, {VIDEO_FPS} fps)")
    if result["stopped"]:
        no_video = "; no video was written" if args.video is not None and not result["video"] else ""
        stopped = f"stopped by Ctrl-C after {len(scores)} of {args.episodes} games{no_video}"
        print(f"{parser.prog}: {stopped}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
