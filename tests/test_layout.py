"""The backend's parts import one way: the core modules (config, errors, naming, metrics) import nothing of
the backend but each other; lora imports the core; model imports lora and the core; engine imports model,
lora and the core; serving imports any of those; the commands (serve, cluster, merge) anything. Serving and
the commands may use the client library (client.api: KServe tensors; client.server: tritonserver processes),
which imports nothing of the backend. Nothing in backend/ imports the demo builders, the tests, the
benchmarks or the rest of the client."""

import ast
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parent.parent / "backend"
RANK = {"core": 0, "lora": 1, "model": 2, "engine": 3, "serving": 4, "commands": 5}
CORE = {"config", "errors", "naming", "metrics"}
COMMANDS = {"serve", "cluster", "merge"}
OUTSIDE = {"demo", "tests", "benchmarks", "client"}
LIBRARY = {"client.api", "client.server"}  # for serving and the commands
FILES = sorted(p for p in BACKEND.rglob("*.py") if p != BACKEND / "__init__.py")


def part(module: str) -> str:
    """backend.lora.ops -> lora; backend.config -> core; backend.serve -> commands."""
    name = module.split(".")[1]
    return "core" if name in CORE else "commands" if name in COMMANDS else name


def imported(path: Path) -> set[str]:
    """The modules a file imports, at its top or inside a function (from backend.x import y: backend.x.y)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(BACKEND.parent).with_suffix("").parts)


def test_every_module_is_in_a_part():
    parts = {module_of(p): part(module_of(p)) for p in FILES}
    assert set(parts.values()) == set(RANK), parts


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(BACKEND)))
def test_imports_run_one_way(path):
    mine = part(module_of(path))
    for name in imported(path):
        library = any(name == m or name.startswith(m + ".") for m in LIBRARY) and RANK[mine] >= RANK["serving"]
        assert library or name.split(".")[0] not in OUTSIDE, f"{module_of(path)} imports {name}"
        if name.startswith("backend."):
            assert RANK[part(name)] <= RANK[mine], f"{module_of(path)} ({mine}) imports {name} ({part(name)})"


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_the_client_library_imports_nothing_of_the_backend(module):
    path = BACKEND.parent / (module.replace(".", "/") + ".py")
    assert not [n for n in imported(path) if n.split(".")[0] in {"backend", "demo"}]
