"""The layers: the speed machinery below the experiment, the experiment, the tools above it."""

import ast

from conftest import ROOT

from ppo_breakout import SCRIPT_FILES
from ppo_breakout import TOOLS as SUBCOMMANDS

OURS = {path.stem for path in ROOT.glob("*.py")}
TOOLS = OURS - {"ppo_breakout", "speed"}


def module_level_imports(tree: ast.AST):
    """The imports that run when the module is imported: all but those inside functions."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]
        yield from module_level_imports(node)


def all_imports(name: str) -> set:
    tree = ast.parse((ROOT / name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_experiment_imports_its_tools_only_inside_functions():
    # the tools import the experiment: it reads on its own, and importing it loads none of them
    tree = ast.parse((ROOT / "ppo_breakout.py").read_text())
    imported = set(module_level_imports(tree)) & TOOLS
    assert TOOLS >= {"cli", "run_files", "evaluate", "plots", "dashboard", "distributed", "bench"}
    assert not imported, f"ppo_breakout.py imports {sorted(imported)} at module level"


def test_the_speed_machinery_imports_nothing_of_ours():
    assert all_imports("speed.py") & OURS == set()
    assert "torch" in all_imports("speed.py")


def test_the_script_files_are_every_module_the_script_imports():
    # what a copy of the script needs beside it (bench.py's torchrun runs, the tests' copies): what
    # it imports, and the modules its main hands subcommands and torchrun's ranks to
    needed, todo = set(), ["ppo_breakout", "distributed", *SUBCOMMANDS.values()]
    while todo:
        name = todo.pop()
        needed.add(name)
        todo += sorted((all_imports(f"{name}.py") & OURS) - needed - {"bench"})
    assert {f"{name}.py" for name in needed} == {f for f in SCRIPT_FILES if f.endswith(".py")}
    assert ".labml.yaml" in SCRIPT_FILES
