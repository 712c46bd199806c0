"""The package's import graph, read from the sources (AST): no module imports another's
private names, and no two modules import each other, directly or around a loop. Every
import counts, including those inside functions (a function-level import postpones a
cycle, it does not remove it). Importing a package's own submodule from the package's
``__init__`` is not a cycle (Python imports the parent first by definition)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "qlora_kernels"


def _extension_modules() -> set[str]:
    """The compiled modules, as setup.py declares them (they have no .py source here)."""
    return set(re.findall(r'Extension\(\s*"(qlora_kernels\.[\w.]+)"', (ROOT / "setup.py").read_text()))


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(name: str, path: Path, known: set[str]):
    """(imported module, imported name or None) for every import statement in the file."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub, None) if sub in known else (mod, a.name)


def graph():
    mods = _modules()
    known = set(mods) | _extension_modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private, unresolved = [], []
    for m, path in mods.items():
        for target, name in _imports(m, path, known):
            if not target.startswith("qlora_kernels"):
                continue
            if target not in known:  # a module that moved or never existed: fails only when run
                unresolved.append(f"{m} imports {target}")
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c imports a and a.b first
                t = ".".join(parts[:i])
                if t in mods and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(f"{m} imports {name} from {target}")
    return edges, private, unresolved


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    edges = graph()[0]
    assert {"qlora_kernels.nn", "qlora_kernels.functional", "qlora_kernels.bench.linear",
            "qlora_kernels.integrations.peft"} <= set(edges)
    assert "qlora_kernels.nn" in edges["qlora_kernels.integrations.peft"]
    assert "qlora_kernels.bench.harness" in edges["qlora_kernels.bench.linear"]


def test_no_import_cycles():
    assert _cycles(graph()[0]) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_names():
    assert graph()[1] == []


def test_every_import_inside_the_package_names_a_module_that_exists():
    assert graph()[2] == []


def _fresh_python(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(e, **env))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("module", ["qlora_kernels", "qlora_kernels.cli"])
def test_importing_the_package_or_its_command_loads_no_torch(module):
    """The public API loads torch on first use (PEP 562), not at import."""
    assert _fresh_python(f"import sys, {module}; print('torch' in sys.modules)") == "False"


def test_the_commands_parser_loads_no_torch():
    code = ("import sys\nfrom qlora_kernels import cli\n"
            "for argv in (['--help'], ['finetune', '--help'], ['export', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    assert _fresh_python(code).splitlines()[-1] == "False"


def test_the_public_api_and_torch_ops_work_after_a_lazy_import():
    code = ("import qlora_kernels as qk, torch\n"
            "p, s = qk.quantize_4bit(torch.randn(4, 64))\n"
            "print(hasattr(torch.ops.qlora_kernels, 'linear_4bit'), qk.nn.Linear4bit.__name__, "
            "sorted(set(qk.__all__) - set(dir(qk))))")
    assert _fresh_python(code) == "True Linear4bit []"


def test_finetune_sets_passive_openmp_before_torch_loads_without_re_executing():
    """The command used to exec itself again to set OMP_WAIT_POLICY; now it sets the
    variable before torch (and libgomp) load. The same interpreter carries on (an exec
    would never reach the print), torch loads after the variable is set."""
    code = ("import os, sys\nfrom qlora_kernels import cli\nsys.argv[0] = 'qlora-kernels'\n"
            "rc = cli.main(['finetune', '--data', '/nonexistent/data.jsonl'])\n"
            "print(rc, os.environ.get('OMP_WAIT_POLICY'))")
    assert _fresh_python(code).splitlines()[-1] == "2 PASSIVE"
    code_set = code.replace("import os, sys", "import os, sys\nos.environ['OMP_WAIT_POLICY'] = 'ACTIVE'")
    assert _fresh_python(code_set).splitlines()[-1] == "2 ACTIVE"  # an explicit choice is kept
