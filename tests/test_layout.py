"""The layers: every module imports only modules below it, at the top of the file; the one
exception is the entry point's `if __name__ == "__main__":` block, which hands the command line up."""

import ast

from conftest import ROOT

from cli import SCRIPT_FILES, SUBCOMMANDS

OURS = {path.stem for path in ROOT.glob("*.py")}


def is_main_block(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imports(name: str, main_block: bool = False) -> dict:
    """{module of ours: where} that the file `name`.py imports: at the top ("top"), anywhere else
    ("inside a function", "inside a class", ...), or by name through importlib ("importlib"). The
    `if __name__ == "__main__":` block is left out unless `main_block`."""
    found = {}

    def visit(node: ast.AST, where: str):
        for child in ast.iter_child_nodes(node):
            if is_main_block(child) and not main_block:
                continue
            here = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                here = "inside a function"
            elif isinstance(child, ast.ClassDef):
                here = "inside a class"
            elif where == "top" and not isinstance(node, ast.Module):
                here = "inside a block"
            if isinstance(child, ast.Import):
                names = [alias.name.split(".")[0] for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module.split(".")[0]]
            else:
                names = []
            if isinstance(child, ast.Call) and "import_module" in ast.unparse(child.func):
                found.setdefault("<importlib>", "importlib")
            for imported in names:
                if imported in OURS:
                    found.setdefault(imported, here)
            visit(child, here)

    visit(ast.parse((ROOT / f"{name}.py").read_text()), "top")
    return found


def test_every_module_imports_ours_only_at_its_top():
    for name in sorted(OURS):
        elsewhere = {module: where for module, where in imports(name).items() if where != "top"}
        assert not elsewhere, f"{name}.py imports {elsewhere}"


def test_the_modules_form_layers_without_a_circle():
    # each module sits above everything it imports: a topological order exists, and it is the
    # one the README's "Files" describes
    graph = {name: set(imports(name)) for name in OURS}
    below = {}

    def depth(name, path=()):
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in below:
            below[name] = 1 + max((depth(other, (*path, name)) for other in graph[name]), default=-1)
        return below[name]

    for name in OURS:
        depth(name)
    # the algorithm stands on the Atari protocol and the speed machinery alone; the tools stand on it
    assert graph["ppo_breakout"] == {"game", "speed"}
    assert graph["game"] == graph["speed"] == set()
    for tool in OURS - {"ppo_breakout", "game", "speed"}:
        assert below[tool] > below["ppo_breakout"], tool
    assert below["bench"] == max(below.values())


def test_the_experiment_names_the_tools_only_in_its_main_block():
    # `python ppo_breakout.py` reaches the command line (cli.py) and torchrun's ranks
    # (distributed.py) from there, and from nowhere else
    assert set(imports("ppo_breakout", main_block=True)) - set(imports("ppo_breakout")) == {"cli", "distributed"}


def test_the_speed_machinery_and_the_game_import_torch_and_ale_py_but_nothing_of_ours():
    assert imports("speed") == {} and imports("game") == {}
    assert "import torch" in (ROOT / "speed.py").read_text()
    assert "import ale_py" in (ROOT / "game.py").read_text()


def test_the_script_files_are_every_module_the_script_imports():
    # what a copy of the script needs beside it (bench.py's torchrun runs, the tests' copies): what
    # it imports, its main block's too, and the files that own its subcommands
    needed, todo = set(), ["ppo_breakout"]
    while todo:
        name = todo.pop()
        needed.add(name)
        todo += sorted(set(imports(name, main_block=True)) - needed)
    assert {SUBCOMMANDS[name].__module__ for name in SUBCOMMANDS} <= needed
    assert {f"{name}.py" for name in needed} == {f for f in SCRIPT_FILES if f.endswith(".py")}
    assert ".labml.yaml" in SCRIPT_FILES
