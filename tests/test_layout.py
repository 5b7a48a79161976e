"""The layout issue #17 asks for: the experiment in one readable file, the tools beside it."""

import ast

from conftest import ROOT

TOOLS = {"cli", "run_files", "plots", "evaluate", "dashboard", "bench"}


def lines(name: str) -> list:
    return (ROOT / name).read_text().splitlines()


def test_the_experiment_is_at_most_1000_lines_with_the_model_before_line_600():
    source = lines("ppo_breakout.py")
    assert len(source) <= 1000, f"ppo_breakout.py has {len(source)} lines"
    (model,) = [i + 1 for i, line in enumerate(source) if line.startswith("class Model")]
    assert model < 600, f"class Model starts at line {model}"


def test_no_other_python_file_is_over_1000_lines():
    for path in sorted(ROOT.glob("*.py")):
        assert len(lines(path.name)) <= 1000, f"{path.name} has {len(lines(path.name))} lines"


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


def test_the_experiment_imports_its_tools_only_inside_functions():
    # the tools import the experiment: it reads on its own, and importing it loads none of them
    tree = ast.parse((ROOT / "ppo_breakout.py").read_text())
    imported = set(module_level_imports(tree)) & TOOLS
    assert not imported, f"ppo_breakout.py imports {sorted(imported)} at module level"
