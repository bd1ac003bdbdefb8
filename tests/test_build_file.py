"""BUILD (Bazel) lists every source and test file, and only files that exist.

Bazel cannot run here, so the file is parsed as Starlark (a Python subset) and checked.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rules():
    tree = ast.parse((ROOT / "BUILD").read_text(), "BUILD")
    rules = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            kwargs = {k.arg: k.value for k in call.keywords}
            rules.append((call.func.id, kwargs))
    return rules


def _strings(node):
    return [e.value for e in node.elts if isinstance(e, ast.Constant)] if node is not None else []


def test_every_file_listed_and_exists():
    rules = _rules()
    libs = [kw for kind, kw in rules if kind == "py_library"]
    tests = [kw for kind, kw in rules if kind == "py_test"]
    listed_src = {s for kw in libs for s in _strings(kw["srcs"])}
    listed_tests = {s for kw in tests for s in _strings(kw["srcs"]) if s.startswith("tests/")}
    actual_src = {str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
                  if "__pycache__" not in p.parts}
    actual_tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                    if "__pycache__" not in p.parts}
    assert not actual_src - listed_src, f"sources missing from BUILD: {sorted(actual_src - listed_src)}"
    assert not listed_src - actual_src, f"BUILD lists missing sources: {sorted(listed_src - actual_src)}"
    assert not actual_tests - listed_tests, f"tests missing from BUILD: {sorted(actual_tests - listed_tests)}"
    assert not listed_tests - actual_tests, f"BUILD lists missing tests: {sorted(listed_tests - actual_tests)}"
    for kw in tests:
        for s in _strings(kw["srcs"]) + _strings(kw.get("data")):
            assert (ROOT / s).exists(), s
    # package data (C++ sources compiled at run time) travels with its library
    listed_data = {s for kw in libs for s in _strings(kw.get("data"))}
    actual_data = {str(p.relative_to(ROOT)) for pattern in ("*.cc", "*.h")
                   for p in (ROOT / "src").rglob(pattern)}
    assert listed_data == actual_data, (sorted(listed_data), sorted(actual_data))


def test_libraries_cover_packages_deps_resolve_and_are_acyclic():
    rules = _rules()
    names = {kw["name"].value for _, kw in rules if "name" in kw}
    libs = {kw["name"].value: kw for kind, kw in rules if kind == "py_library"}
    packages = {str(p.parent.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.py")
                if "__pycache__" not in p.parts}
    lib_dirs = {str(Path(s).parent.relative_to("src")) for kw in libs.values()
                for s in _strings(kw["srcs"])}
    assert lib_dirs == packages
    graph = {}
    for kw in list(libs.values()) + [kw for kind, kw in rules if kind == "py_test"]:
        local = []
        for dep in kw["deps"].elts:
            if isinstance(dep, ast.Constant):
                assert dep.value.lstrip(":") in names, f"unknown dep {dep.value}"
                local.append(dep.value.lstrip(":"))
            else:
                assert isinstance(dep, ast.Call) and dep.func.id == "requirement"
        graph[kw["name"].value] = local
    # Bazel rejects dependency cycles
    state = {}

    def visit(n, path):
        if state.get(n) == 1:
            raise AssertionError(f"dependency cycle: {' -> '.join(path + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in graph.get(n, []):
            visit(d, path + [n])
        state[n] = 2

    for n in libs:
        visit(n, [])


def test_build_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "update_build.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
