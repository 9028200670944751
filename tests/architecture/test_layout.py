"""The layout's rules, checked: no import cycles, no torch in the server's import path, no tools in the wheel."""

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from repo_paths import REPO_ROOT

PACKAGES = ("model", "server")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, at module level or inside functions alike (a cycle hidden
    behind a function-level import is still a cycle in the design)."""
    modules = {_module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from package import module` imports the module; `from module import name` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_in_model_or_server():
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_sees_function_level_imports():
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b"]]


def test_importing_the_app_does_not_import_torch():
    code = "import sys, server.app, server.cli.main; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_the_product_never_imports_the_tools():
    graph = _import_graph()
    assert not [name for name, targets in graph.items() if any(t.startswith("tools") for t in targets)]
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            assert not re.search(r"(?<![\w.])tools\.", path.read_text()), path


def test_the_architecture_doc_names_every_module():
    doc = (REPO_ROOT / "docs" / "architecture.md").read_text()
    modules = [p for top in (*PACKAGES, "tools") for p in (REPO_ROOT / top).rglob("*.py") if p.name != "__init__.py"]
    assert [str(p.relative_to(REPO_ROOT)) for p in modules if p.name not in doc] == []


@pytest.mark.slow
def test_the_wheel_holds_no_parity_or_benchmark_code(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("multitalk_server-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("model/pipeline.py") for n in names) and any(n.startswith("server/app.py") for n in names)
    assert "server/api/playground/index.html" in names
    assert not [n for n in names if n.startswith(("tools/", "tests/", "scripts/")) or "golden" in n
                or n.endswith(("real_size.py", "flops.py"))]
