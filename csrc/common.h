// Shared helpers of the CPU kernels: storage dtypes, conversions to and from fp32, argument checks.
// The kernels take raw pointers from Python (which has already checked shapes, devices and contiguity)
// and never link libtorch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace headkv {

enum Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline void check_dtype(int dtype, const char* name) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) {
    throw std::invalid_argument(std::string(name) + ": dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16), got " +
                                std::to_string(dtype));
  }
}

inline void check_positive(int64_t value, const char* name) {
  if (value <= 0) throw std::invalid_argument(std::string(name) + " must be positive, got " + std::to_string(value));
}

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1fu) {
    u = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN
  } else if (exponent != 0) {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    u = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_fp16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (abs < 0x38800000u) {                         // subnormal or zero in fp16
    if (abs < 0x33000000u) return sign;
    const uint32_t shift = 126u - (abs >> 23);
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    // value / 2^-24 = mantissa / 2^shift, rounded to nearest even
    const uint32_t total_shift = shift;
    uint32_t half = mantissa >> total_shift;
    const uint32_t rest = mantissa & ((1u << total_shift) - 1u);
    const uint32_t halfway = 1u << (total_shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t half = ((abs - 0x38000000u) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

// Row `row` (n values) of a buffer of `dtype`, converted to fp32 into `out`.
inline void load_row(const void* base, int dtype, int64_t row, int64_t n, float* __restrict out) {
  if (dtype == kFloat32) {
    std::memcpy(out, static_cast<const float*>(base) + row * n, n * sizeof(float));
  } else if (dtype == kBFloat16) {
    const uint16_t* src = static_cast<const uint16_t*>(base) + row * n;
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(src[i]);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + row * n;
    for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(src[i]);
  }
}

inline void store_row(void* base, int dtype, int64_t row, int64_t n, const float* __restrict in) {
  if (dtype == kFloat32) {
    std::memcpy(static_cast<float*>(base) + row * n, in, n * sizeof(float));
  } else if (dtype == kBFloat16) {
    uint16_t* dst = static_cast<uint16_t*>(base) + row * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(in[i]);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(base) + row * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_fp16(in[i]);
  }
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline void scale_row(float alpha, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace headkv
