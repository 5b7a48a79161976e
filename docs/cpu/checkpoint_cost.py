"""The size and write time of a checkpoint of the default run (8 workers x 128 steps).

    python docs/cpu/checkpoint_cost.py CODE_FOLDER LABEL

CODE_FOLDER holds the script at the commit to measure (`git archive COMMIT | tar -x -C FOLDER`).
"""

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, sys.argv[1])
warnings.filterwarnings("ignore")  # labml's note on dynamic hyperparameters outside an experiment

import ppo_breakout as ppo  # noqa: E402
import run_files  # noqa: E402

with ppo.Trainer(*ppo.settings(updates=2)) as trainer:
    trainer.run_training_loop()
    times, sizes = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(7):
            trainer.update = 10 + i  # a new file each time, as a run writes them
            start = time.perf_counter()
            path = run_files.save_checkpoint(trainer, Path(folder), keep=3)
            times.append(time.perf_counter() - start)
            sizes.append(path.stat().st_size)
median, low, high = (1000 * f(times) for f in (statistics.median, min, max))
size = sizes[-1] / 2**20
print(f"{sys.argv[2]}: checkpoint {size:.2f} MiB, written in {median:.0f} ms (median of 7; {low:.0f} to {high:.0f})")
