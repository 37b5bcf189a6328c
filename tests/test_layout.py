"""The repository's shape: one room per concern. The modules import each other as a DAG (a reader can start
at the bottom, common.py, and go up), nothing imports the scripts that run things (train.py, sample.py), each
module imports on its own, and every function fits on a screen."""
import ast
import subprocess
import sys

import pytest

from conftest import REPO

MODULES = sorted(p.stem for p in REPO.glob("*.py"))
SCRIPTS_NOBODY_IMPORTS = ("train", "sample")
MAX_FUNCTION_LINES = 60


def repo_imports(name):
    """The repository's modules that module `name` imports anywhere in it (inside functions too)."""
    tree = ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(MODULES) - {name})


def test_the_repository_is_the_modules_the_readme_names():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert {"common", "checkpoint", "decoding", "runtime", "optim"} <= set(MODULES)
    assert all(f"`{m}.py`" in readme for m in MODULES), [m for m in MODULES if f"`{m}.py`" not in readme]


def test_the_import_graph_has_no_cycle():
    graph = {m: repo_imports(m) for m in MODULES}
    state = {}  # 1: on the current path, 2: done

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


@pytest.mark.parametrize("script", SCRIPTS_NOBODY_IMPORTS)
def test_no_module_imports_the_scripts_that_run_things(script):
    assert [m for m in MODULES if script in repo_imports(m)] == []


def test_common_imports_nothing_of_the_repository_and_model_only_torch():
    assert repo_imports("common") == [] and repo_imports("model") == []
    assert repo_imports("decoding") == []  # it knows token ids and a model's forward, no tokenizer


def test_each_module_imports_on_its_own():
    # one interpreter; before each import every module of the repository is forgotten, so none can rely
    # on another having been imported first
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
for name in {MODULES!r}:
    for m in {MODULES!r}:
        sys.modules.pop(m, None)
    __import__(name)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_every_function_fits_on_a_screen():
    long = []
    for m in MODULES:
        for node in ast.walk(ast.parse((REPO / f"{m}.py").read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.py:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_every_script_turns_bad_input_into_one_line_and_exit_code_2():
    for m in MODULES:
        text = (REPO / f"{m}.py").read_text(encoding="utf-8")
        if 'if __name__ == "__main__":' in text:
            main_block = text.split('if __name__ == "__main__":', 1)[1]
            assert "run_cli(" in main_block or "cli(" in main_block, m
            assert "sys.exit(1)" not in text, m
