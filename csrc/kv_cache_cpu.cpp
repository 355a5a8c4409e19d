// KV-cache ops for the paged sampler: schema registration + CPU implementations.
//
// Layout (one layer's cache): k_cache, v_cache are [num_pages, page_size, kv_heads, head_dim], contiguous.
// A "slot" is page * page_size + offset; slot -1 means "no slot" (padding token, skipped).
//
//   store_kv(k[T, Hkv, D], v[T, Hkv, D], k_cache!, v_cache!, slot_mapping[T] int32, check_slots=True)
//                                                                                      writes token t to its slot
//   copy_pages(k_cache!, v_cache!, src[n] int32, dst[n] int32)                         copy-on-write of whole pages
//
// Inputs are validated here (TORCH_CHECK_VALUE -> Python ValueError) because a bad slot would be an out-of-bounds
// write, which on CUDA is a device assert and on CPU silent memory corruption. The slot range check reads the slots:
// free on CPU (always done), one device->host sync per call on CUDA, so there `check_slots=False` skips it for a
// caller that guarantees the range (the sampler: its slots come from the page allocator, once per step, not per
// layer). The CUDA copy_pages checks no id range (see kv_cache_cuda.cpp); the CUDA kernels skip bad indices.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <cstring>

#include "checks.h"
#include "cpu_ops.h"

namespace dash {

// Shared argument checks (device-independent, declared in checks.h); also used by the CUDA binding.
void check_store_kv_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(k.dim() == 3, "store_kv: k must be [T, kv_heads, head_dim], got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "store_kv: v shape ", v.sizes(), " != k shape ", k.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "store_kv: k_cache must be [num_pages, page_size, kv_heads, head_dim], got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "store_kv: v_cache shape ", v_cache.sizes(),
                    " != k_cache shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "store_kv: k_cache heads/head_dim ",
                    k_cache.sizes(), " do not match k ", k.sizes());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), "store_kv: slot_mapping must be [T=",
                    k.size(0), "], got ", slot_mapping.sizes());
  TORCH_CHECK_VALUE(slot_mapping.scalar_type() == at::kInt, "store_kv: slot_mapping must be int32, got ",
                    slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
                        k.scalar_type() == v.scalar_type(),
                    "store_kv: dtype mismatch: k ", k.scalar_type(), ", v ", v.scalar_type(), ", k_cache ",
                    k_cache.scalar_type(), ", v_cache ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "store_kv: caches must be contiguous");
  check::same_device("store_kv", k_cache, {&k, &v, &v_cache, &slot_mapping});
}

void check_copy_pages_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& src,
                           const at::Tensor& dst) {
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
                    "copy_pages: caches must be equal [num_pages, page_size, kv_heads, head_dim], got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), "copy_pages: dtype mismatch: k_cache ",
                    k_cache.scalar_type(), ", v_cache ", v_cache.scalar_type());  // pages are copied as bytes
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "copy_pages: caches must be contiguous");
  TORCH_CHECK_VALUE(src.dim() == 1 && dst.sizes() == src.sizes(), "copy_pages: src and dst must be equal 1-D, got ",
                    src.sizes(), " and ", dst.sizes());
  TORCH_CHECK_VALUE(src.scalar_type() == at::kInt && dst.scalar_type() == at::kInt,
                    "copy_pages: src and dst must be int32");
  check::same_device("copy_pages", k_cache, {&v_cache, &src, &dst});
}

namespace {

// Minimum rows per parallel task: a row is kv_heads * head_dim elements, tiny; batching rows keeps the
// OpenMP dispatch overhead below the copy cost.
constexpr int64_t kGrainTokens = 64;

}  // namespace

void store_kv_cpu(const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping, bool /*check_slots: the CPU check is free, always done*/) {
  check_store_kv_args(k_in, v_in, k_cache, v_cache, slot_mapping);
  const auto k = k_in.contiguous();
  const auto v = v_in.contiguous();
  const auto slots_t = slot_mapping.contiguous();
  const int64_t num_tokens = k.size(0);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t row = k.size(1) * k.size(2);  // elements per token
  const int32_t* slots = slots_t.data_ptr<int32_t>();
  // Validate every slot before writing anything, so a bad mapping never leaves a half-written cache.
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK_VALUE(slots[t] >= -1 && slots[t] < num_slots, "store_kv: slot_mapping[", t, "] = ", slots[t],
                      " is outside [-1, ", num_slots, ")");
  }
  const int64_t bytes = row * k.element_size();
  const char* ks = static_cast<const char*>(k.data_ptr());
  const char* vs = static_cast<const char*>(v.data_ptr());
  char* kd = static_cast<char*>(k_cache.data_ptr());
  char* vd = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, num_tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;
      std::memcpy(kd + s * bytes, ks + t * bytes, bytes);
      std::memcpy(vd + s * bytes, vs + t * bytes, bytes);
    }
  });
}

namespace {

void copy_pages_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_in, const at::Tensor& dst_in) {
  check_copy_pages_args(k_cache, v_cache, src_in, dst_in);
  const auto src_t = src_in.contiguous();
  const auto dst_t = dst_in.contiguous();
  const int64_t n = src_t.size(0);
  const int64_t num_pages = k_cache.size(0);
  const int32_t* src = src_t.data_ptr<int32_t>();
  const int32_t* dst = dst_t.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(src[i] >= 0 && src[i] < num_pages && dst[i] >= 0 && dst[i] < num_pages,
                      "copy_pages: pair ", i, " (", src[i], " -> ", dst[i], ") is outside [0, ", num_pages, ")");
  }
  const int64_t page_bytes = k_cache.stride(0) * k_cache.element_size();
  char* kd = static_cast<char*>(k_cache.data_ptr());
  char* vd = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(kd + dst[i] * page_bytes, kd + src[i] * page_bytes, page_bytes);
      std::memcpy(vd + dst[i] * page_bytes, vd + src[i] * page_bytes, page_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY(dash, m) {
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "bool check_slots=True) -> ()");
  m.def("copy_pages(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor src, Tensor dst) -> ()");
}

TORCH_LIBRARY_IMPL(dash, CPU, m) {
  m.impl("store_kv", &store_kv_cpu);
  m.impl("copy_pages", &copy_pages_cpu);
}

}  // namespace dash
