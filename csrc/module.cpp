// The Python module object of dash_kernels._C. Torch ops register themselves through TORCH_LIBRARY when this
// shared library is loaded (kv_cache_cpu.cpp, kv_cache_cuda.cpp); pybind11 objects are added to `m` here.
#include <torch/extension.h>

namespace dash {
void bind_page_allocator(pybind11::module_& m);  // csrc/page_allocator.cpp
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& page_table, const at::Tensor& context_lens,
                               const std::optional<at::Tensor>& cu_seqlens_q,
                               double scale);  // csrc/paged_attention_cpu.cpp
}  // namespace dash

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "DASH native ops: paged KV-cache store and page copy, fused RMSNorm, RoPE and token sampling "
      "(torch.ops.dash.*).";
  dash::bind_page_allocator(m);
  m.def("paged_attention", &dash::paged_attention_cpu, pybind11::arg("q"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("page_table"), pybind11::arg("context_lens"),
        pybind11::arg("cu_seqlens_q"), pybind11::arg("scale"),
        "CPU fp32 paged attention (decode, or causal query runs when cu_seqlens_q is given) read in place from the "
        "KV pages (csrc/paged_attention_cpu.cpp).");
#ifdef DASH_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
