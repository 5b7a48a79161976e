"""The time of one evaluation step (`evaluate`'s forward pass of one frame stack, and the game's
step) with 1 and with 2 torch threads.

    python docs/cpu/evaluate_threads.py POLICY_OR_CHECKPOINT
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ppo_breakout as ppo  # noqa: E402
from game import Game  # noqa: E402
from run_files import load_checkpoint  # noqa: E402

_, state = load_checkpoint(sys.argv[1])
model = ppo.Model(state["n_actions"])
model.load_state_dict(state["model"])
model.eval()
game = Game(1, state["configs"]["game"], clip_rewards=False)
obs = torch.from_numpy(game.reset()).unsqueeze(0)
for threads in (1, 2, 1, 2):
    torch.set_num_threads(threads)
    times = []
    with torch.no_grad():
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(100):
                model(obs)
            times.append((time.perf_counter() - start) / 100)
    print(f"{threads} torch thread(s): forward pass of one frame stack, median {statistics.median(times) * 1e3:.2f} ms")
start = time.perf_counter()
for _ in range(1000):
    game.step(np.random.randint(state["n_actions"]))
print(f"game step (4 frames): {(time.perf_counter() - start) / 1000 * 1e3:.2f} ms")
