"""docs/flags.md's flag table is `python ppo_breakout.py --help`: the same flags, defaults and help;
the README's two commands run on a fresh image, and CI runs the second."""

import argparse
import re

import pytest
from conftest import ROOT

import cli


def readme_flag_rows() -> dict:
    """{flag: (default, help)} from the rows of docs/flags.md's "## Flags" table."""
    text = (ROOT / "docs" / "flags.md").read_text()
    section = re.search(r"^## Flags\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "docs/flags.md has no '## Flags' section"
    rows = {}
    for line in section.group(1).splitlines():
        row = re.fullmatch(r"\|\s*`(--[\w-]+)`\s*\|(.*?)\|(.*)\|\s*", line)
        if row:
            flag, default, help = (cell.strip() for cell in row.groups())
            assert flag not in rows, f"{flag} has two rows"
            rows[flag] = (default, help)
    return rows


def parser_flags() -> dict:
    """{flag: (default, help)} for every training flag of `python ppo_breakout.py --help` but
    -h/--help; a boolean flag under its --x name, not its --no-x."""
    flags = {}
    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        (flag,) = [option for option in action.option_strings if not option.startswith("--no-")]
        flags[flag] = (str(action.default), action.help)
    return flags


def test_the_readme_lists_every_flag_and_only_those():
    readme, parser = set(readme_flag_rows()), set(parser_flags())
    assert readme == parser, f"missing from flags.md: {sorted(parser - readme)}; not flags: {sorted(readme - parser)}"


@pytest.mark.parametrize("flag", sorted(parser_flags()))
def test_each_readme_row_has_the_flags_default_and_help(flag):
    rows = readme_flag_rows()
    assert flag in rows, f"{flag} has no row in docs/flags.md"
    default, help = parser_flags()[flag]
    assert rows[flag][0] == default, f"{flag}: docs/flags.md default {rows[flag][0]!r}, --help {default!r}"
    assert rows[flag][1] == help, f"{flag}: docs/flags.md help {rows[flag][1]!r}, --help {help!r}"


def test_the_readmes_two_commands_run_on_a_fresh_image_and_ci_runs_the_second_word_for_word():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^Install and [^\n]*:\n\n    (.+)$", text, flags=re.M)
    assert len(commands) == 2, commands
    train, test = commands
    assert train.startswith("python3 -m venv venv && . venv/bin/activate && pip install -r requirements.txt")
    # a fresh image has no package lists: apt-get install alone says "Unable to locate package"
    assert test.startswith("apt-get update -qq && apt-get install ")
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
