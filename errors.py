"""
How every command of ppo_breakout says what is wrong with its input: one line on stderr, naming
the argument and the problem, and exit status 2, before anything starts. The training flags, each
subcommand's and bench.py's share it.
"""

import argparse
import sys
from typing import Optional

from ppo_breakout import parse_device


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag said in one line, the problem and where to look, instead of the
    usage block before it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message: str) -> int:
    """One line on stderr naming the problem; the exit status for bad input."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def seed_problem(seed: int) -> Optional[str]:
    if seed < 0:
        return f"must be 0 or more, got {seed}"
    return f"must be less than 2**64 (torch seeds are 64-bit), got {seed}" if seed >= 2**64 else None


def device_problem(name: str) -> Optional[str]:
    try:
        parse_device(name)
    except ValueError as e:
        return str(e)
    return None
