// The Python module object of dash_kernels._C. Torch ops register themselves through TORCH_LIBRARY when this
// shared library is loaded (kv_cache_cpu.cpp, kv_cache_cuda.cpp); pybind11 objects are added to `m` here.
#include <torch/extension.h>

namespace dash { void bind_page_allocator(pybind11::module_& m); }  // csrc/page_allocator.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DASH native ops: paged KV-cache store and page copy (torch.ops.dash.*).";
  dash::bind_page_allocator(m);
#ifdef DASH_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
