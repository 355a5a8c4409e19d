// CUDA kernels for the paged KV cache, behind a plain C ABI (raw pointers, sizes, cudaStream_t) so that nvcc
// compiles this file for sm_80 / sm_90 without torch headers; kv_cache_cuda.cpp binds it as torch ops.
//
// Both ops are pure byte moves, so they are dtype-agnostic: a token's row is row_bytes bytes
// (kv_heads * head_dim * element size) and a page is page_bytes bytes. Rows are copied in 16-byte vectors when
// every pointer and size is 16-byte aligned (the common case: head_dim * 2 bytes is a multiple of 16), else bytewise.
//
// Range contract: a slot outside [0, num_slots) or a page id outside [0, num_pages) is skipped by the kernel, never
// read or written, so a caller that does not validate its indices (the binding checks them only when asked: that
// check is a host sync) cannot corrupt memory.
//
// Error reporting: each launcher returns the status of its own launch. cudaGetLastError after a launch returns and
// clears the last error of the thread, which may come from earlier work (another library's unchecked launch); so
// the launchers first peek (cudaPeekAtLastError, which clears nothing) and return kPendingError without launching
// when an error was already pending, leaving it in place for its owner. The binding reports the two cases apart.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 128;    // one block per token / page; 128 x 16 B covers a 2 KiB row per pass
constexpr int kMaxBlocks = 65535;  // grid-stride loops keep us under the y/z limits and small grids
constexpr int kPendingError = -1;  // returned instead of a cudaError_t: an earlier error was pending, nothing launched

template <typename Vec>
__global__ void store_kv_kernel(const char* __restrict__ k, const char* __restrict__ v, char* __restrict__ k_cache,
                                char* __restrict__ v_cache, const int32_t* __restrict__ slots, int64_t num_tokens,
                                int64_t num_slots, int64_t row_bytes) {
  const int64_t n_vec = row_bytes / sizeof(Vec);
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= num_slots) continue;  // -1: padding token; out of range: never written
    const Vec* ks = reinterpret_cast<const Vec*>(k + t * row_bytes);
    const Vec* vs = reinterpret_cast<const Vec*>(v + t * row_bytes);
    Vec* kd = reinterpret_cast<Vec*>(k_cache + slot * row_bytes);
    Vec* vd = reinterpret_cast<Vec*>(v_cache + slot * row_bytes);
    for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
      kd[i] = ks[i];
      vd[i] = vs[i];
    }
  }
}

template <typename Vec>
__global__ void copy_pages_kernel(char* __restrict__ k_cache, char* __restrict__ v_cache,
                                  const int32_t* __restrict__ src, const int32_t* __restrict__ dst, int64_t n,
                                  int64_t num_pages, int64_t page_bytes) {
  const int64_t n_vec = page_bytes / sizeof(Vec);
  for (int64_t p = blockIdx.x; p < n; p += gridDim.x) {
    const int64_t from = src[p];
    const int64_t to = dst[p];
    if (from < 0 || from >= num_pages || to < 0 || to >= num_pages) continue;  // out of range: skipped
    const Vec* ks = reinterpret_cast<const Vec*>(k_cache + from * page_bytes);
    const Vec* vs = reinterpret_cast<const Vec*>(v_cache + from * page_bytes);
    Vec* kd = reinterpret_cast<Vec*>(k_cache + to * page_bytes);
    Vec* vd = reinterpret_cast<Vec*>(v_cache + to * page_bytes);
    for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
      kd[i] = ks[i];
      vd[i] = vs[i];
    }
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline int grid_for(int64_t n) { return static_cast<int>(n < kMaxBlocks ? (n > 0 ? n : 1) : kMaxBlocks); }

// The launch's own status: read right after it, with nothing pending before it (checked by the caller).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" {

// Writes row t of k / v (row_bytes each) to slot slots[t] of k_cache / v_cache; a slot of -1, or outside
// [0, num_slots), is skipped. Returns 0, the launch's cudaError_t, or kPendingError (see the top of this file).
int dash_store_kv_cuda(const void* k, const void* v, void* k_cache, void* v_cache, const int32_t* slots,
                       int64_t num_tokens, int64_t num_slots, int64_t row_bytes, cudaStream_t stream) {
  if (num_tokens == 0) return 0;
  if (cudaPeekAtLastError() != cudaSuccess) return kPendingError;
  const bool vec = row_bytes % 16 == 0 && aligned16(k) && aligned16(v) && aligned16(k_cache) && aligned16(v_cache);
  if (vec) {
    store_kv_kernel<uint4><<<grid_for(num_tokens), kThreads, 0, stream>>>(
        static_cast<const char*>(k), static_cast<const char*>(v), static_cast<char*>(k_cache),
        static_cast<char*>(v_cache), slots, num_tokens, num_slots, row_bytes);
  } else {
    store_kv_kernel<char><<<grid_for(num_tokens), kThreads, 0, stream>>>(
        static_cast<const char*>(k), static_cast<const char*>(v), static_cast<char*>(k_cache),
        static_cast<char*>(v_cache), slots, num_tokens, num_slots, row_bytes);
  }
  return launch_status();
}

// Copies whole pages src[i] -> dst[i] (page_bytes each) in both caches: the copy-on-write of a forked sequence's
// partial last page. A pair with an id outside [0, num_pages) is skipped. Returns as dash_store_kv_cuda.
int dash_copy_pages_cuda(void* k_cache, void* v_cache, const int32_t* src, const int32_t* dst, int64_t n,
                         int64_t num_pages, int64_t page_bytes, cudaStream_t stream) {
  if (n == 0) return 0;
  if (cudaPeekAtLastError() != cudaSuccess) return kPendingError;
  const bool vec = page_bytes % 16 == 0 && aligned16(k_cache) && aligned16(v_cache);
  if (vec) {
    copy_pages_kernel<uint4><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<char*>(k_cache), static_cast<char*>(v_cache), src, dst, n, num_pages, page_bytes);
  } else {
    copy_pages_kernel<char><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<char*>(k_cache), static_cast<char*>(v_cache), src, dst, n, num_pages, page_bytes);
  }
  return launch_status();
}

}  // extern "C"
