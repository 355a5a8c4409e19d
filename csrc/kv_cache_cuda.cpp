// CUDA implementations of the dash::store_kv / dash::copy_pages torch ops: validate on the host what the host knows
// (shapes, dtypes, devices, layout: tensor metadata, no sync), then call the plain-C-ABI launchers in kv_cache.cu
// on the current stream. Compiled only in a CUDA build (DASH_WITH_CUDA).
//
// Index ranges live on the device, so checking them costs a device -> host sync. store_kv checks its slots only
// when asked (check_slots, one sync for both bounds); copy_pages never does (it runs per layer on each copy-on-write
// step; dash_kernels/copy_pages.py checks device ids once, on request). Either way the kernels skip an index out of
// range rather than touch memory outside the caches (kv_cache.cu).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "checks.h"

extern "C" {
int dash_store_kv_cuda(const void* k, const void* v, void* k_cache, void* v_cache, const int32_t* slots,
                       int64_t num_tokens, int64_t num_slots, int64_t row_bytes, cudaStream_t stream);
int dash_copy_pages_cuda(void* k_cache, void* v_cache, const int32_t* src, const int32_t* dst, int64_t n,
                         int64_t num_pages, int64_t page_bytes, cudaStream_t stream);
}

namespace dash {
namespace {

constexpr int kPendingError = -1;  // kv_cache.cu: an error of earlier work was pending, nothing was launched

// Turns a launcher's status into an error that blames the right work.
void check_launch(int status, const char* op) {
  if (status == kPendingError) {
    const cudaError_t pending = cudaPeekAtLastError();
    TORCH_CHECK(false, op, ": not launched, a CUDA error from earlier work was pending: ",
                cudaGetErrorString(pending), " (CUDA reports errors of asynchronous kernels at a later call; rerun "
                "with CUDA_LAUNCH_BLOCKING=1 to find the kernel that failed)");
  }
  TORCH_CHECK(status == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

void store_kv_cuda(const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping, bool check_slots) {
  check_store_kv_args(k_in, v_in, k_cache, v_cache, slot_mapping);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto k = k_in.contiguous();
  const auto v = v_in.contiguous();
  const auto slots = slot_mapping.contiguous();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  // Bounds check on the device tensor: one reduction and one host sync, skipped when the caller guarantees the
  // range (check_slots=False, the sampler's per-layer calls); the kernel skips a bad slot either way.
  if (check_slots && slots.numel() > 0) {
    const auto bounds = at::aminmax(slots);
    const auto both = at::stack({std::get<0>(bounds), std::get<1>(bounds)}).cpu();
    const int32_t lo = both[0].item<int32_t>();
    const int32_t hi = both[1].item<int32_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < num_slots, "store_kv: slot_mapping has entries outside [-1, ", num_slots,
                      ") (min ", lo, ", max ", hi, ")");
  }
  check_launch(dash_store_kv_cuda(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                  slots.data_ptr<int32_t>(), k.size(0), num_slots,
                                  k.size(1) * k.size(2) * k.element_size(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "store_kv");
}

void copy_pages_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_in, const at::Tensor& dst_in) {
  check_copy_pages_args(k_cache, v_cache, src_in, dst_in);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto src = src_in.contiguous();
  const auto dst = dst_in.contiguous();
  check_launch(dash_copy_pages_cuda(k_cache.data_ptr(), v_cache.data_ptr(), src.data_ptr<int32_t>(),
                                    dst.data_ptr<int32_t>(), src.size(0), k_cache.size(0),
                                    k_cache.stride(0) * k_cache.element_size(),
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "copy_pages");
}

}  // namespace

TORCH_LIBRARY_IMPL(dash, CUDA, m) {
  m.impl("store_kv", &store_kv_cuda);
  m.impl("copy_pages", &copy_pages_cuda);
}

}  // namespace dash
