// The Python module object of dash_kernels._C. Torch ops register themselves through TORCH_LIBRARY when this
// shared library is loaded (kv_cache_cpu.cpp, kv_cache_cuda.cpp); pybind11 objects are added to `m` here.
#include <torch/extension.h>

#include "cpu_ops.h"

namespace dash {
void bind_page_allocator(pybind11::module_& m);  // csrc/page_allocator.cpp
}  // namespace dash

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "DASH native ops: paged KV-cache store and page copy, fused RMSNorm, RoPE and token sampling "
      "(torch.ops.dash.*).";
  dash::bind_page_allocator(m);
  m.def("paged_attention", &dash::paged_attention_cpu, pybind11::arg("q"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("page_table"), pybind11::arg("context_lens"),
        pybind11::arg("cu_seqlens_q"), pybind11::arg("scale"),
        // Without the GIL: a long call must not stall the process's other Python threads.
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "CPU fp32 paged attention (decode, or causal query runs when cu_seqlens_q is given) read in place from the "
        "KV pages (csrc/paged_attention_cpu.cpp).");
  m.def("decoder_layer", &dash::decoder_layer_cpu, pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("eps"),
        pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("slot_mapping"), pybind11::arg("page_table"), pybind11::arg("context_lens"),
        pybind11::arg("cu_seqlens_q"), pybind11::arg("scale"), pybind11::arg("packed") = std::vector<at::Tensor>{},
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "One fp32 CPU decoder layer on the paged KV cache, x updated in place (csrc/decoder_layer_cpu.cpp).");
  m.def("has_avx512", &dash::has_avx512, "Whether this CPU runs the packed AVX-512 GEMMs (csrc/linear_cpu.cpp).");
  m.def("pack_linear", &dash::pack_linear_cpu, pybind11::arg("w"),
        "A weight [N, K] in the packed GEMM layout [ceil(N/32), K, 32] (csrc/linear_cpu.cpp).");
  m.def("pack_gate_up", &dash::pack_gate_up_cpu, pybind11::arg("gate"), pybind11::arg("up"),
        "SwiGLU's gate and up weights [I, K] interleaved in 16-column halves: [ceil(I/16), K, 32].");
  m.def("linear_packed", &dash::linear_packed_cpu, pybind11::arg("x"), pybind11::arg("packed"),
        pybind11::arg("n_out"), pybind11::arg("bias"), pybind11::arg("out"), pybind11::arg("accumulate"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "x [M, K] W^T (+ bias) on a packed weight, into out (or out += when accumulate).");
  m.def("gate_up_silu_packed", &dash::gate_up_silu_packed_cpu, pybind11::arg("x"), pybind11::arg("packed"),
        pybind11::arg("n_out"), pybind11::arg("out") = std::nullopt,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "silu(x W_gate^T) * (x W_up^T) [M, I] on a pack_gate_up weight (into out when given).");
#ifdef DASH_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
