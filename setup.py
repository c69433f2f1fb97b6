"""Build of the one extension module, ``infomax_ext._C``.

CPU sources are always compiled; ``csrc/cuda/*.cu`` are added when CUDA is
usable (a CUDA build of torch and an nvcc) or ``FORCE_CUDA=1``; ``FORCE_CPU=1``
builds the CPU kernels only. The emulated CUDA backend (the same ``.cu`` files
compiled as C++ by ``csrc/emulated/*.cpp``, run on the CPU) is built unless
``NO_EMULATED_CUDA=1``; it needs neither nvcc nor a CUDA build of torch.
Honours ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``, ``DEBUG=1`` and
``SANITIZE=address|thread`` (instrumented build, for tools/sanitize.sh).
Build without isolation (torch must already be installed):

    pip install --no-build-isolation -e .
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for users
    sys.exit(
        "infomax_ext: torch must be installed before building (the build runs without "
        "isolation so that the extension links against the torch you run). Install torch, "
        "then: pip install --no-build-isolation -e ."
    )


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def read_version():
    with open(os.path.join(ROOT, "infomax_ext", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def find_nvcc():
    """Point torch at a real toolkit: with only CUDA_HOME unset it guesses /usr/local
    here (a wrapper nvcc lives in /usr/local/bin) and then misses the headers."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
            cpp_extension.CUDA_HOME = "/usr/local/cuda"
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def decide_cuda():
    """Returns (use_cuda, reason)."""
    if env_flag("FORCE_CPU"):
        return False, "FORCE_CPU=1"
    nvcc = find_nvcc()
    torch_cuda = torch.version.cuda
    if env_flag("FORCE_CUDA"):
        if torch_cuda is None:
            sys.exit(
                f"infomax_ext: FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build "
                "and cannot link CUDA code; install a CUDA build of torch or unset FORCE_CUDA."
            )
        if nvcc is None:
            sys.exit("infomax_ext: FORCE_CUDA=1 but no nvcc was found (set CUDA_HOME).")
        return True, "FORCE_CUDA=1"
    if torch_cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if nvcc is None:
        return False, "no nvcc found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch_cuda}) and {nvcc}"


def with_ptx(arch_list):
    """The arch list with +PTX on its highest arch (unless some entry has it already), so
    that the driver can JIT the kernels for GPUs newer than the list. Empty stays empty
    (torch then builds for the visible GPU)."""
    archs = [a for a in re.split(r"[;\s]+", arch_list.strip()) if a]
    if not archs or any(a.endswith("+PTX") for a in archs):
        return arch_list
    key = lambda a: tuple(int(x) for x in re.findall(r"\d+", a)[:2])  # noqa: E731
    top = max(archs, key=key)
    return ";".join(a + "+PTX" if a == top else a for a in archs)


def main():
    version = read_version()
    debug = env_flag("DEBUG")
    use_cuda, reason = decide_cuda()
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    emulated = not env_flag("NO_EMULATED_CUDA")
    if emulated:
        sources += sorted(glob.glob(os.path.join("csrc", "emulated", "*.cpp")))
    sanitize = os.environ.get("SANITIZE", "")
    if sanitize not in ("", "address", "thread"):
        sys.exit(f"infomax_ext: SANITIZE must be 'address' or 'thread', got {sanitize!r}")
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    link = ["-fopenmp"]
    if sanitize:
        # NB: -O1 -g keeps the reports readable and the instrumented tests fast enough.
        opt = ["-O1", "-g", f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        link.append(f"-fsanitize={sanitize}")
    # NB: -fno-math-errno / -fno-trapping-math let GCC vectorise the tile loops;
    # unlike -ffast-math they keep inf and NaN semantics, which the -inf guards need.
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math", f'-DINFOMAX_EXT_VERSION="{version}"']
    if emulated:
        # NB: the kernels' `#pragma unroll` means nothing to GCC (the emulated build).
        cxx += ["-DINFOMAX_WITH_EMULATED_CUDA", "-Wno-unknown-pragmas"]
    define_archs = ""
    extra = {"cxx": cxx}
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # NB: without a visible GPU torch's arch detection raises IndexError.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = with_ptx(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
        define_archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "native"
        extra["nvcc"] = opt[:1] + ["--expt-relaxed-constexpr", "-lineinfo"]
        if cuda_sources:  # build_info reports "cuda" only when kernels are compiled in
            cxx.append("-DINFOMAX_WITH_CUDA")
        sources += cuda_sources
    cxx.append(f'-DINFOMAX_CUDA_ARCHS="{define_archs}"')
    if use_cuda:
        extra["nvcc"].append(f'-DINFOMAX_CUDA_ARCHS="{define_archs}"')
    Ext = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    ext = Ext(
        "infomax_ext._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=link,
    )
    backend = "+".join(["cpu"] + (["cuda"] if use_cuda else []) + (["cuda_emulated"] if emulated else []))
    print(
        f"infomax_ext {version}: building backends [{backend}] ({reason}); "
        f"{len(sources)} sources, {len(cuda_sources) if use_cuda else 0} CUDA; "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '-')}, MAX_JOBS={os.environ['MAX_JOBS']}",
        flush=True,
    )
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


main()
