// The Python module object of dash_kernels._C. Every tensor op is a torch op registered through TORCH_LIBRARY beside
// its kernel (torch.ops.dash.*: the schema and CPU kernel in csrc/*_cpu.cpp, CUDA kernels in csrc/*_cuda.cpp), with
// its fake kernel in Python beside its public function (dash_kernels/*.py). Loading this module's shared library is
// what registers them. The pybind11 objects below are what is not a tensor op:
// - the page allocator (csrc/page_allocator.cpp), a stateful C++ class;
// - has_avx512(), a fact about the host CPU: it takes no tensor, so the dispatcher has no key to route it by, and a
//   fake kernel or torch.compile trace of it would have nothing to describe;
// - WITH_CUDA, whether this build has the CUDA kernels.
#include <torch/extension.h>

#include "cpu_ops.h"

namespace dash {
void bind_page_allocator(pybind11::module_& m);  // csrc/page_allocator.cpp
}  // namespace dash

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "DASH native code: the paged KV-cache page allocator and a CPU capability query; the tensor ops (KV-cache store "
      "and page copy, RMSNorm, RoPE, token sampling, paged attention, packed GEMMs, the fused decoder layer) are "
      "torch.ops.dash.*.";
  dash::bind_page_allocator(m);
  m.def("has_avx512", &dash::has_avx512, "Whether this CPU runs the packed AVX-512 GEMMs (csrc/linear_cpu.cpp).");
#ifdef DASH_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
