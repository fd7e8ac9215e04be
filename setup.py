"""Builds tokenbounds._C from csrc/.

CPU kernels are always built. CUDA kernels and their thin torch bindings are built only when
torch itself is a CUDA build and nvcc is available; otherwise the CPU-only extension is built and
a missing nvcc is never an error. Set TOKENBOUNDS_NO_EXT=1 to skip the extension entirely (the
package then falls back to the Triton / reference paths with a warning).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("TOKENBOUNDS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    want_cuda = (
        torch.version.cuda is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("TOKENBOUNDS_NO_CUDA") != "1"
    )
    if want_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda_bindings/*.cpp")
        ext = CUDAExtension(
            "tokenbounds._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("TOKENBOUNDS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "tokenbounds._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "tokenbounds",
        "tokenbounds.ops",
        "tokenbounds.bounds",
        "tokenbounds.quant",
        "tokenbounds.hessian",
        "tokenbounds.eval",
        "tokenbounds.models",
        "tokenbounds.length",
        "tokenbounds.commands",
        "tokenbounds.prequential",
        "tokenbounds.compress",
        "tokenbounds.triton_kernels",
    ],
    package_dir={
        "tokenbounds": "pyext",
        "tokenbounds.ops": "pyext/ops",
        "tokenbounds.bounds": "pyext/bounds",
        "tokenbounds.quant": "pyext/quant",
        "tokenbounds.hessian": "pyext/hessian",
        "tokenbounds.eval": "pyext/eval",
        "tokenbounds.models": "pyext/models",
        "tokenbounds.length": "pyext/length",
        "tokenbounds.commands": "pyext/commands",
        "tokenbounds.prequential": "pyext/prequential",
        "tokenbounds.compress": "pyext/compress",
        "tokenbounds.triton_kernels": "triton_kernels",
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
