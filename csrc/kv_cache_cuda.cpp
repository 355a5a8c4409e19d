// CUDA implementations of the dash::store_kv / dash::copy_pages torch ops: validate on the host, then call the
// plain-C-ABI launchers in kv_cache.cu on the current stream. Compiled only in a CUDA build (DASH_WITH_CUDA).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

extern "C" {
int dash_store_kv_cuda(const void* k, const void* v, void* k_cache, void* v_cache, const int32_t* slots,
                       int64_t num_tokens, int64_t row_bytes, cudaStream_t stream);
int dash_copy_pages_cuda(void* k_cache, void* v_cache, const int32_t* src, const int32_t* dst, int64_t n,
                         int64_t page_bytes, cudaStream_t stream);
}

namespace dash {

void check_store_kv_args(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&);
void check_copy_pages_args(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

namespace {

void store_kv_cuda(const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping, bool check_slots) {
  check_store_kv_args(k_in, v_in, k_cache, v_cache, slot_mapping);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto k = k_in.contiguous();
  const auto v = v_in.contiguous();
  const auto slots = slot_mapping.contiguous();
  // Bounds check on the device tensor: two reductions and two host syncs (an unchecked bad slot is an illegal
  // address), skipped when the caller guarantees the range (check_slots=False, the sampler's per-layer calls).
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  if (check_slots && slots.numel() > 0) {
    TORCH_CHECK_VALUE(slots.min().item<int32_t>() >= -1 && slots.max().item<int32_t>() < num_slots,
                      "store_kv: slot_mapping has entries outside [-1, ", num_slots, ")");
  }
  const int err = dash_store_kv_cuda(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                     slots.data_ptr<int32_t>(), k.size(0), k.size(1) * k.size(2) * k.element_size(),
                                     c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "store_kv: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void copy_pages_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_in, const at::Tensor& dst_in) {
  check_copy_pages_args(k_cache, v_cache, src_in, dst_in);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto src = src_in.contiguous();
  const auto dst = dst_in.contiguous();
  const int64_t num_pages = k_cache.size(0);
  if (src.numel() > 0) {
    TORCH_CHECK_VALUE(src.min().item<int32_t>() >= 0 && src.max().item<int32_t>() < num_pages &&
                          dst.min().item<int32_t>() >= 0 && dst.max().item<int32_t>() < num_pages,
                      "copy_pages: page ids outside [0, ", num_pages, ")");
  }
  const int err = dash_copy_pages_cuda(k_cache.data_ptr(), v_cache.data_ptr(), src.data_ptr<int32_t>(),
                                       dst.data_ptr<int32_t>(), src.size(0), k_cache.stride(0) * k_cache.element_size(),
                                       c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "copy_pages: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

TORCH_LIBRARY_IMPL(dash, CUDA, m) {
  m.impl("store_kv", &store_kv_cuda);
  m.impl("copy_pages", &copy_pages_cuda);
}

}  // namespace dash
