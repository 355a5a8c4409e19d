"""Build dash_kernels._C: torch ops for the paged KV cache (CPU always; CUDA when a toolkit and a CUDA torch exist).

Rules (see docs/install.md):
  * The C++ extension is always built (CppExtension, CPU kernels).
  * The .cu sources are added (CUDAExtension) only when torch is a CUDA build AND a CUDA toolkit of the same major
    is found (CUDA_HOME, else the folder the `nvcc` on PATH really runs from); otherwise, or with
    DASH_SKIP_CUDA_BUILD=1, we warn and build the CPU extension. Never a failure for lack of CUDA
    (dash_kernels/build_compat.py decides; tests/packaging/test_build_compat.py fakes the versions).
  * The build writes dash_kernels/_C_build.json (the torch it compiled against) next to the .so; import compares it.
  * TORCH_CUDA_ARCH_LIST is respected when set; otherwise we emit -gencode for sm_80 and sm_90.
  * MAX_JOBS (ninja parallelism) is honoured by torch's BuildExtension; NVCC_THREADS sets nvcc --threads.
  * DEBUG=1 builds with -O0 -g.
Install with `pip install -e . --no-build-isolation` so the build sees the torch you already have (build isolation
would download a fresh, multi-GB CUDA torch just to build).
"""

import glob
import importlib.util
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = ("80", "90")  # A100 and H100: the targets CI compiles and checks for spills


def _load_build_compat():
    """dash_kernels/build_compat.py by path: importing the package would import torch and triton first."""
    spec = importlib.util.spec_from_file_location("dash_build_compat", os.path.join(ROOT, "dash_kernels",
                                                                                    "build_compat.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compat = _load_build_compat()
# torch guesses CUDA_HOME as dirname(dirname(which nvcc)) at import of cpp_extension: wrong for a wrapper script such as
# /usr/local/bin/nvcc (it would read /usr/local/include). Ask nvcc itself where its toolkit is, before that import.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _toolkit = compat.find_toolkit(shutil.which("nvcc"))
    if _toolkit:
        os.environ["CUDA_HOME"] = _toolkit

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402
import torch  # noqa: E402


def _want_cuda() -> bool:
    plan = compat.cuda_build_plan(torch.version.cuda, compat.nvcc_release(CUDA_HOME),
                                  skip=os.environ.get("DASH_SKIP_CUDA_BUILD", "0") == "1", cuda_home=CUDA_HOME)
    if not plan.build_cuda:
        warnings.warn(plan.reason)
    else:
        print(f"dash_kernels._C: {plan.reason}")
    return plan.build_cuda


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, then the build record next to the .so (and next to the in-place copy of an editable
    install): dash_kernels._ext compares it with the importing torch and names the fix on a mismatch."""

    def run(self):
        super().run()
        with_cuda = any(s.endswith(".cu") for ext in self.extensions for s in ext.sources)
        text = compat.build_record(torch.__version__, torch.version.cuda, with_cuda)
        folders = {os.path.join(self.build_lib, "dash_kernels")}
        if self.inplace:
            folders.add(self.get_finalized_command("build_py").get_package_dir("dash_kernels"))
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, compat.RECORD_NAME), "w", encoding="utf-8") as f:
                f.write(text)


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math (torch builds with it too): a float compare may not raise FP exceptions, so the compiler can
    # turn `x < c ? c : x` into a SIMD select (csrc/paged_attention_cpu.cpp's exp and max loops). No -ffast-math.
    cxx = opt + ["-std=c++17", "-fno-trapping-math"]
    # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop, whatever
    # torch.set_num_threads says. libgomp.so.1 then resolves to the copy torch has already loaded (same soname).
    omp = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
    cxx += omp
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_only = [s for s in sources if s.endswith("_cuda.cpp")]
    if not _want_cuda():
        return CppExtension("dash_kernels._C", [s for s in sources if s not in cuda_only],
                            extra_compile_args={"cxx": cxx}, extra_link_args=omp)
    nvcc = opt + ["-std=c++17", "--expt-relaxed-constexpr"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        for arch in DEFAULT_CUDA_ARCHS:
            nvcc += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        # Plus PTX of the newest target, which the driver JIT-compiles for newer GPUs (sm_100, sm_120): machine code
        # alone would leave them "no kernel image is available". Older GPUs (sm_75) need TORCH_CUDA_ARCH_LIST.
        newest = DEFAULT_CUDA_ARCHS[-1]
        nvcc += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    nvcc += ["--threads", os.environ.get("NVCC_THREADS", "2")]
    return CUDAExtension(
        "dash_kernels._C",
        sources + sorted(glob.glob("csrc/*.cu")),
        define_macros=[("DASH_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DDASH_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=omp,
    )


setup(
    packages=find_packages(include=["dash", "dash.*", "dash_kernels", "dash_kernels.*"]),
    package_data={"dash": ["assets/**/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
)
