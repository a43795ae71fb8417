"""The shape of the code: sizes a reader can hold, layers without import cycles, one error root, one task contract.

Each check lists its offenders, so a failure says where to cut."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slimtune"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_no_file_or_function_over_the_size_limits():
    offenders = []
    for path in _modules().values():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            offenders.append(f"{path.relative_to(SRC)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}(): {length} lines")
    assert not offenders, "over the size limits:\n" + "\n".join(offenders)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of `if TYPE_CHECKING:` blocks: annotations only, never run."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """slimtune module -> the slimtune modules it imports, function-level imports included."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        deps = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps.update(n for n in names if n in modules and n != name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles (function-level imports count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_does_not_import_torch():
    """`slimtune validate` / `schema` and the CLI's --help read configs; torch costs seconds to import."""
    code = ("import sys, slimtune.config, slimtune.tasks; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_probing_of_tasks_or_models():
    """Tasks are one typed contract (tasks/base.py) and information does not ride on the model object."""
    pattern = re.compile(r"hasattr\(task|getattr\(task|_slimtune_|_user_errors")
    hits = [f"{path.relative_to(SRC)}:{i}: {line.strip()}"
            for path in _modules().values()
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_no_task_name_outside_tasks():
    from slimtune.tasks import TASKS

    names = re.compile("|".join(re.escape(f'"{n}"') for n in TASKS))
    hits = [f"{path.relative_to(SRC)}:{i}: {line.strip()}"
            for name, path in _modules().items() if not name.startswith("slimtune.tasks")
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if names.search(line)]
    assert not hits, "task names spelled outside tasks/:\n" + "\n".join(hits)


def test_every_error_of_slimtune_derives_from_the_root():
    from slimtune.errors import SlimtuneError
    from slimtune.train.callbacks import StopTraining

    import slimtune

    for info in pkgutil.walk_packages(slimtune.__path__, "slimtune."):
        if not info.name.endswith("__main__"):  # runs the CLI
            importlib.import_module(info.name)
    offenders = []
    for name in list(sys.modules):
        if not name.startswith("slimtune"):
            continue
        for _, cls in inspect.getmembers(sys.modules[name], inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException):
                continue
            if not issubclass(cls, (SlimtuneError, StopTraining)):  # StopTraining: control flow, not an error
                offenders.append(f"{name}.{cls.__name__}")
    assert not offenders, "exceptions that are not SlimtuneError: " + ", ".join(offenders)


def test_task_contract_is_complete():
    """Every registered task implements the required members (the base class raises NotImplementedError)."""
    from slimtune.tasks import TASKS, get_task
    from slimtune.tasks.base import Task

    required = [n for n, member in vars(Task).items()
                if callable(member) and "raise NotImplementedError" in inspect.getsource(member)]
    assert "load_data" in required and "eval_step" in required
    for name, spec in TASKS.items():
        task = get_task(name)
        assert isinstance(task, Task) and task.spec is spec
        missing = [m for m in required if getattr(type(task), m) is getattr(Task, m)]
        assert not missing, f"{name}: {missing}"
