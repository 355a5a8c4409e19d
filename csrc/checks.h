// The argument checks every dash op runs before it touches memory, in one place. Each raises c10::ValueError
// (Python ValueError) whose message starts with the op and names the argument and what it must be, e.g.
// "rms_norm: weight must be a contiguous fp32 CPU tensor [H=24], got Float [7]".
//
// Why a check before any work: these kernels index raw pointers, so a wrong shape, dtype or device is an
// out-of-bounds read or write (silent memory corruption on CPU, a device assert on CUDA), not an exception.
// Checks read only tensor metadata (no data, no device sync); range checks of index tensors stay in each op.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace dash::check {

// The dtype as Python users write it ("int32", not c10's "Int").
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "fp32";
    case at::kDouble: return "fp64";
    case at::kHalf: return "fp16";
    case at::kBFloat16: return "bf16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(dtype);
  }
}

// Any number of dims: the `dim` argument of the helpers below.
constexpr int64_t kAnyDim = -1;

// `t` has `dim` dims (kAnyDim: any).
inline void dims(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(dim == kAnyDim || t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got ", t.sizes());
}

// `t` is contiguous.
inline void contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// `t` has dtype `dtype`.
inline void dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                    dtype_name(t.scalar_type()));
}

// `t` is on `device`.
inline void device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

// `t` is a contiguous CPU tensor of `dtype` with `dim` dims: what the CPU kernels read through raw pointers.
inline void cpu_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                       int64_t dim = kAnyDim) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                        (dim == kAnyDim || t.dim() == dim),
                    op, ": ", name, " must be a contiguous ", dtype_name(dtype), " CPU tensor",
                    dim == kAnyDim ? "" : " with " + std::to_string(dim) + " dims", ", got ",
                    dtype_name(t.scalar_type()), " ", t.sizes(), " on ", t.device(),
                    t.is_contiguous() ? "" : " (not contiguous)");
}

// fp32 shorthand of cpu_tensor: the sampler's CPU kernels are fp32 only.
inline void fp32_cpu(const char* op, const char* name, const at::Tensor& t, int64_t dim = kAnyDim) {
  cpu_tensor(op, name, t, at::kFloat, dim);
}

// `t` has exactly `shape`.
inline void shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must be ", shape, ", got ", t.sizes());
}

// Every tensor of `others` is on `ref`'s device (one kernel reads them all).
inline void same_device(const char* op, const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others) {
    TORCH_CHECK_VALUE(t->device() == ref.device(), op, ": all tensors must be on ", ref.device(), ", got one on ",
                      t->device());
  }
}

}  // namespace dash::check

namespace dash {

// Op-specific checks shared by an op's CPU and CUDA implementations (defined in csrc/kv_cache_cpu.cpp): shapes,
// dtypes, layout and devices of store_kv's and copy_pages's arguments, metadata only.
void check_store_kv_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slot_mapping);
void check_copy_pages_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& src,
                           const at::Tensor& dst);

}  // namespace dash
