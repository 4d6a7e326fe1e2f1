"""The shape of the code: one concern per file, no import circles, inference apart from training,
one formatter and linter (ruff, configured in pyproject.toml)."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

MODULES = sorted(path.stem for path in REPO.glob("*.py"))


def local_imports(module):
    """The top-level modules of this repository that `module` imports, anywhere in its code (a lazy
    import inside a function counts: it closes a circle all the same)."""
    tree = ast.parse((REPO / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def imported_in_a_fresh_process(module, candidates):
    code = f"import sys, {module}; print(sorted(m for m in {tuple(candidates)!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_no_module_imports_itself_through_others():
    graph = {module: local_imports(module) for module in MODULES}

    def circle_from(start):
        """A path start -> ... -> start through the graph, or None (depth-first)."""
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [" -> ".join(circle) for module in MODULES if (circle := circle_from(module))]
    assert circles == []


def test_importing_any_script_runs_nothing_and_writes_nothing(tmp_path):
    """multiprocessing's spawn start method (macOS, Windows) imports the main script again in every
    worker: a script whose work is not behind `if __name__ == "__main__"` would start over in each."""
    result = subprocess.run(
        [sys.executable, "-c", f"import {', '.join(MODULES)}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == "" and os.listdir(tmp_path) == []


def test_training_does_not_load_the_data_pipeline():
    """Training reads shards: it needs neither fineweb.py nor pyarrow (nor their second of start-up)."""
    assert imported_in_a_fresh_process("train_gpt2", ("fineweb", "pyarrow", "datasets")) == "[]"


@pytest.mark.parametrize("module", ["sample", "chat", "serve", "export", "hellaswag", "evals"])
def test_inference_does_not_load_training(module):
    training = ("train_gpt2", "finetune", "resume", "optim", "fineweb", "dataloader", "pyarrow", "datasets")
    assert imported_in_a_fresh_process(module, training) == "[]"


def test_no_source_file_is_over_about_800_lines():
    """One concern per file keeps files short: about 800 lines at most (bench.py, seven benchmarks, is the longest)."""
    lengths = {module: len((REPO / f"{module}.py").read_text().splitlines()) for module in MODULES}
    assert {module: n for module, n in lengths.items() if n > 850} == {}


def test_train_gpt2_takes_at_most_20_names_from_local_modules():
    """A module imported whole counts as one name (`import resume`), `from device import a, b` as two."""
    names = []
    for node in ast.parse((REPO / "train_gpt2.py").read_text()).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            names += [alias.name for alias in node.names]
    assert len(names) <= 20, names


@pytest.mark.parametrize("command", [["format", "--check", "--diff"], ["check"]])
def test_the_tree_passes_ruff(command):
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(ruff):
        pytest.skip("ruff is not installed (requirements-test.txt)")
    result = subprocess.run([ruff, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_layout_table_names_every_file_and_only_files_that_exist():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| file | the one concern it owns |") :]
    table = table[: table.index("\n\n")]
    named = set(re.findall(r"`([a-z_0-9]+\.(?:py|html))`", table))
    assert named == {f"{module}.py" for module in MODULES} | {"chat.html"}
