// Helpers shared by the CPU kernels (torch side: argument checks, dtype dispatch, the dropout seed).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <type_traits>

namespace metagpt_fast::cpu {

// Float32, bfloat16 and float16 inputs (three instantiations per kernel); every kernel computes in float32.
#define MGF_DISPATCH_FLOATING(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// The Philox key of a dropout call: read from the 1-element int64 ``seed`` (required iff dropout_p > 0).
inline uint64_t read_seed(const c10::optional<at::Tensor>& seed, double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK(seed.has_value(), op, ": seed is required when dropout_p > 0");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
              ": seed must be a 1-element int64 tensor, got ", seed->sizes(), " ", seed->scalar_type());
  return static_cast<uint64_t>(seed->cpu().item<int64_t>());
}

// ``t`` with a unit stride in its last dimension (a copy only if it has not).
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

// Rows [0, rows) x [0, cols) of src (leading dimension ld) as float32: the input itself for float, else converted
// into buf (leading dimension cols). Returns the pointer and sets *ld_out.
template <typename T>
inline const float* float_rows(const T* src, int64_t rows, int64_t cols, int64_t ld, float* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    *ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) buf[r * cols + c] = to_float(src[r * ld + c]);
    *ld_out = cols;
    return buf;
  }
}

// A float32 view of row r of a (M, N) contiguous tensor: the row itself for float32, else a converted copy in buf.
template <typename T>
inline const float* float_row(const T* base, int64_t r, int64_t n, float* buf) {
  const T* row = base + r * n;
  if constexpr (std::is_same_v<T, float>) {
    return reinterpret_cast<const float*>(row);
  } else {
    for (int64_t c = 0; c < n; ++c) buf[c] = to_float(row[c]);
    return buf;
  }
}

// src (float32) stored as T.
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = from_float<T>(src[c]);
}

}  // namespace metagpt_fast::cpu
