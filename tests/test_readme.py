"""Every Python block of README.md runs as pasted: each in a fresh interpreter, alone, so
a block that leans on a name defined in another block fails here."""
import os
import re
import subprocess
import sys

import pytest

import infomax_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.skipif(not infomax_ext._backend.has_emulated_cuda(), reason="needs the compiled module (emulated CUDA)")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_pasted(index, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"README block {index + 1} failed:\n{BLOCKS[index]}\n{out.stderr[-3000:]}"


def test_links_resolve_inside_the_repository():
    """Every relative link of the README and docs/ names a file of the repository."""
    pages = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "README.md")]
    pages += [os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]
    for page in pages:
        with open(page) as f:
            targets = re.findall(r"\]\(([^)\s#]+)", f.read())
        for target in targets:
            if re.match(r"[a-z]+://", target):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert path.startswith(ROOT + os.sep) and os.path.exists(path), f"{page}: {target}"
