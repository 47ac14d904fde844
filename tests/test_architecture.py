"""The import rule of docs/ARCHITECTURE.md and shared/DESIGN.md, read from the source with ``ast``.

* The top-level scripts (``*.py`` at the top of the repository) are the layers'
  stories: they import ``periscope/``, and no script imports another script.
* Nothing in ``periscope/`` imports a script: the library serves the layers,
  never the other way round.
* The Airflow DAGs orchestrate the layers and may call the scripts' functions,
  but only inside their tasks (a DAG file is parsed by Airflow's scheduler,
  which must not load a layer to read a schedule).
* No test module imports another module of ``tests/``: what tests share is a
  fixture or a plain helper in ``tests/conftest.py`` (``from tests.conftest
  import ...``, the one module of ``tests/`` a test may import: pytest loads it
  as ``tests.conftest`` too, so it is the same module, not a copy).
* ``pyproject.toml`` lists every script as a ``py-module``, so the editable
  install (``make setup``) makes each of them importable from anywhere.

Imports are found anywhere in a file (inside functions too), including
``importlib.import_module("name")`` and ``__import__("name")`` with a literal
name. Each rule is first checked against a small tree made to break it, so a
rule that stopped finding anything would fail here too.
"""
from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def scripts(root: Path) -> set[str]:
    """The module names of the top-level scripts."""
    return {path.stem for path in root.glob("*.py")}


def imports(path: Path) -> Iterator[tuple[int, str, bool]]:
    """``(line, module, inside a function)`` per import of a file (a relative one as ``.name``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    yield from _imports(tree, in_function=False)


def _imports(node: ast.AST, in_function: bool) -> Iterator[tuple[int, str, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield child.lineno, alias.name, in_function
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # from . import x / from .x import y
                names = [child.module] if child.module else [alias.name for alias in child.names]
                for name in names:
                    yield child.lineno, "." + name, in_function
            elif child.module == "tests":
                for alias in child.names:  # from tests import helper: the module tests.helper
                    yield child.lineno, f"{child.module}.{alias.name}", in_function
            else:
                yield child.lineno, child.module, in_function
        elif isinstance(child, ast.Call) and _is_dynamic_import(child):
            yield child.lineno, child.args[0].value, in_function
        function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(child, in_function or function)


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    name = (func.attr if isinstance(func, ast.Attribute)
            else func.id if isinstance(func, ast.Name) else None)
    return (name in ("import_module", "__import__") and bool(call.args)
            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str))


def top(module: str) -> str:
    return module.split(".")[0]


def import_rule_violations(root: Path) -> list[str]:
    """Every import that breaks the rule, as ``file:line imports module (why)``."""
    names = scripts(root)
    found = []
    for path in sorted(root.glob("*.py")):
        for line, module, _ in imports(path):
            if top(module) in names and top(module) != path.stem:
                found.append(f"{path.name}:{line} imports {module} "
                             "(a script imports another script)")
    for path in sorted((root / "periscope").rglob("*.py")):
        for line, module, _ in imports(path):
            if top(module) in names:
                found.append(f"{path.relative_to(root)}:{line} imports {module} "
                             "(periscope/ imports a script)")
    for path in sorted((root / "airflow" / "dags").glob("*.py")):
        for line, module, in_function in imports(path):
            if top(module) in names and not in_function:
                found.append(f"{path.relative_to(root)}:{line} imports {module} outside a task "
                             "(a DAG imports scripts inside its tasks only)")
    return found


def imports_between_test_modules(root: Path) -> list[str]:
    """Every import of a module of ``tests/`` by a file of ``tests/``, but for ``tests.conftest``."""
    tests_dir = root / "tests"
    own = {path.stem for path in tests_dir.glob("*.py")} - {"__init__"}
    found = []
    for path in sorted(tests_dir.glob("*.py")):
        for line, module, _ in imports(path):
            if module == "tests.conftest":
                continue
            if top(module) == "tests" or module.startswith(".") or top(module) in own:
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_import_rule_finds_every_kind_of_violation(tmp_path):
    root = write(tmp_path, {
        "layer_a.py": "import periscope.x\nfrom periscope import y\n",
        "layer_b.py": "from layer_a import something\n",
        "layer_c.py": "def later():\n    import layer_a.sub\n",
        "layer_d.py": "import importlib\nlayer = importlib.import_module('layer_a')\n",
        "periscope/__init__.py": "",
        "periscope/x.py": "from . import y\nimport numpy\n",
        "periscope/y.py": "def f():\n    from layer_b import g\n",
        "periscope/sub/z.py": "import layer_c as c\n",
        "airflow/dags/ok_dag.py": "from airflow.sdk import task\n@task\ndef t():\n"
                                  "    import layer_a\n",
        "airflow/dags/bad_dag.py": "import layer_b\n",
    })
    assert import_rule_violations(root) == [
        "layer_b.py:1 imports layer_a (a script imports another script)",
        "layer_c.py:2 imports layer_a.sub (a script imports another script)",
        "layer_d.py:2 imports layer_a (a script imports another script)",
        "periscope/sub/z.py:1 imports layer_c (periscope/ imports a script)",
        "periscope/y.py:2 imports layer_b (periscope/ imports a script)",
        "airflow/dags/bad_dag.py:1 imports layer_b outside a task "
        "(a DAG imports scripts inside its tasks only)",
    ]


def test_scripts_import_no_script_and_periscope_imports_none():
    violations = import_rule_violations(ROOT)
    assert not violations, ("the import rule: scripts import periscope/, no script imports "
                            "another script, periscope/ imports no script, DAGs import scripts "
                            "inside tasks only:\n  " + "\n  ".join(violations))


def test_the_test_module_rule_finds_every_kind_of_import(tmp_path):
    root = write(tmp_path, {
        "tests/__init__.py": "",
        "tests/conftest.py": "import pytest\n",
        "tests/helpers.py": "X = 1\n",
        "tests/test_a.py": "import batch_processor\nfrom periscope import storage\n",
        "tests/test_b.py": "from tests.test_a import thing\n",
        "tests/test_c.py": "from tests import helpers\n",
        "tests/test_d.py": "def f():\n    import tests.test_a\n",
        "tests/test_e.py": "from .test_a import thing\nfrom . import helpers\nimport conftest\n",
        "tests/test_f.py": "from tests.conftest import shared_helper\n",
    })
    assert imports_between_test_modules(root) == [
        "tests/test_b.py:1 imports tests.test_a",
        "tests/test_c.py:1 imports tests.helpers",
        "tests/test_d.py:2 imports tests.test_a",
        "tests/test_e.py:1 imports .test_a",
        "tests/test_e.py:2 imports .helpers",
        "tests/test_e.py:3 imports conftest",
    ]


def test_no_test_module_imports_another():
    found = imports_between_test_modules(ROOT)
    assert not found, ("tests share fixtures through tests/conftest.py, not by importing "
                       "each other:\n  " + "\n  ".join(found))


def test_pyproject_installs_every_script():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setuptools["py-modules"]) == sorted(scripts(ROOT))
    assert setuptools["packages"]["find"]["include"] == ["periscope*"]

