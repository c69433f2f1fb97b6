"""The package's layering: the library does not depend on its demos, the demos use the
public API only, and only ops.py calls the compiled ops."""
import ast
import glob
import os
import subprocess
import sys

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "infomax_ext")
DEMOS = sorted(glob.glob(os.path.join(PKG, "experiments", "*.py"))) + [os.path.join(PKG, "bench.py")]
CORE = [p for p in glob.glob(os.path.join(PKG, "*.py")) if os.path.basename(p) not in ("bench.py", "__main__.py")]


def _imports(path):
    """(module, name) of every import in ``path``, relative ones resolved against the package."""
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].split(os.sep)
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = rel[:-node.level] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [(mod, a.name) for a in node.names]
    return out


def test_core_modules_import_nothing_from_the_demos():
    for path in CORE:
        for mod, name in _imports(path):
            full = f"{mod}.{name}" if name else mod
            assert not full.startswith(("infomax_ext.experiments", "infomax_ext.bench")), (path, full)
    code = ("import sys, infomax_ext, infomax_ext.mi, infomax_ext.distributed\n"
            "bad = [m for m in sys.modules if m.startswith(('infomax_ext.experiments', 'infomax_ext.bench'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(PKG))


def test_demos_use_the_public_api_only():
    """A demo imports public modules and names of the library (the demos' own modules
    among themselves are theirs to share)."""
    for path in DEMOS:
        for mod, name in _imports(path):
            if not mod.startswith("infomax_ext") or mod.startswith("infomax_ext.experiments"):
                continue
            parts = mod.split(".") + ([name] if name else [])
            assert not any(p.startswith("_") for p in parts), f"{os.path.relpath(path, PKG)} imports {'.'.join(parts)}"
        text = open(path).read()
        for private in ("._backend", "._ops(", "._lib(", "torch.ops.infomax_ext"):
            assert private not in text, f"{os.path.relpath(path, PKG)} uses {private}"


def test_only_ops_calls_the_compiled_ops():
    for path in glob.glob(os.path.join(PKG, "**", "*.py"), recursive=True):
        if os.path.basename(path) in ("ops.py", "_backend.py"):
            continue
        text = open(path).read()
        for call in ("torch.ops.infomax_ext", "_score_reduce_backward(", "_score_reduce_with_grad(",
                     "_concat_score_reduce_backward("):
            assert call not in text, f"{os.path.relpath(path, PKG)} calls {call}"


def test_every_library_dependency_is_declared():
    """A third-party module the library imports (lazily too) is in pyproject's dependencies,
    so a plain ``pip install .`` brings it."""
    import re

    with open(os.path.join(os.path.dirname(PKG), "pyproject.toml")) as f:
        deps = re.search(r"^dependencies = \[(.*?)\]", f.read(), flags=re.M | re.S).group(1)
    declared = {re.split(r"[<>=!~ ]", d.strip().strip('"'))[0] for d in deps.split(",") if d.strip()}
    for path in CORE:
        for mod, _ in _imports(path):
            top = mod.split(".")[0]
            if top and top != "infomax_ext" and top not in sys.stdlib_module_names:
                assert top in declared, f"{os.path.basename(path)} imports {top}, not in pyproject's dependencies"
