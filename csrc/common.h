// Shared helpers of the CPU kernels: storage dtypes, conversions to and from fp32, argument checks, the
// vectorisable inner loops. The kernels take raw pointers from Python (which has already checked shapes,
// devices and contiguity) and never link libtorch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define HEADKV_INLINE inline __attribute__((always_inline))

// Code compiled twice, for the baseline ISA and for AVX2/FMA/F16C (picked at run time where the CPU has it),
// so one portable build still uses the wide units.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(HEADKV_NO_AVX2_CLONE)
#define HEADKV_AVX2_CLONE 1
#define HEADKV_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#include <immintrin.h>
#endif

// HEADKV_CHECK(cond, "what", value, ...): throws std::invalid_argument (Python's ValueError) with the parts
// of the message streamed together. Only outside OpenMP regions: an exception must not leave one.
#define HEADKV_CHECK(cond, ...)                                                  \
  do {                                                                           \
    if (!(cond)) throw std::invalid_argument(::headkv::concat(__VA_ARGS__));     \
  } while (0)

namespace headkv {

enum Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Whether the CPU has AVX2/FMA/F16C (asked once).
inline bool cpu_has_avx2() {
#ifdef HEADKV_AVX2_CLONE
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// Whether HEADKV_CPU_BASELINE=1 asked for the baseline build, as last read by read_isa_request().
inline std::atomic<bool>& baseline_requested() {
  static std::atomic<bool> requested{false};
  return requested;
}

// Reads HEADKV_CPU_BASELINE. The bindings call it before each kernel while they hold the GIL, under which Python
// changes the environment: a getenv from the kernel itself, which runs without the GIL, could race a setenv. Read
// per call, not once, so that a process can switch (the tests run both builds).
inline void read_isa_request() {
  const char* baseline = std::getenv("HEADKV_CPU_BASELINE");
  baseline_requested().store(baseline != nullptr && baseline[0] == '1', std::memory_order_relaxed);
}

// Whether the AVX2/FMA/F16C build of a kernel runs: where the CPU has those, unless the baseline was asked for.
inline bool use_avx2() { return cpu_has_avx2() && !baseline_requested().load(std::memory_order_relaxed); }

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

// An allocation that failed, with what it was for (pybind11 raises it as MemoryError with this message).
class AllocationError : public std::bad_alloc {
 public:
  explicit AllocationError(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_num() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// One workspace W(args...) per thread of the parallel region that follows, which must be opened with
// num_threads(workspaces.size()) and take workspaces[thread_num()]. They are built here, before the region,
// because an exception (std::bad_alloc) that leaves an OpenMP region terminates the process: here it reaches
// Python as a MemoryError naming the kernel. No more threads than work items.
template <class W, class... A>
std::vector<W> thread_workspaces(const char* kernel, int64_t work_items, const A&... args) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(work_items, max_threads()));
  try {
    std::vector<W> workspaces;
    workspaces.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) workspaces.emplace_back(args...);
    return workspaces;
  } catch (const std::bad_alloc& e) {
    throw AllocationError(concat(kernel, ": cannot allocate the working memory of ", n, " threads (", e.what(), ")"));
  } catch (const std::length_error& e) {
    throw AllocationError(concat(kernel, ": cannot allocate the working memory of ", n, " threads (", e.what(), ")"));
  }
}

inline void check_dtype(int dtype, const char* name) {
  HEADKV_CHECK(dtype == kFloat32 || dtype == kBFloat16 || dtype == kFloat16, name,
               ": dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16), got ", dtype);
}

inline void check_positive(int64_t value, const char* name) {
  HEADKV_CHECK(value > 0, name, " must be positive, got ", value);
}

inline void check_non_negative(int64_t value, const char* name) {
  HEADKV_CHECK(value >= 0, name, " must be >= 0, got ", value);
}

inline void check_pointer(const void* p, const char* name) {
  HEADKV_CHECK(p != nullptr, name, " must not be a null pointer");
}

// Rows base[i] .. base[i] + length[i] of every (sequence, head) must lie inside a pool of `pool_rows` rows.
inline void check_row_ranges(const int64_t* base, const int64_t* length, int64_t count, int64_t pool_rows) {
  for (int64_t i = 0; i < count; ++i) {
    HEADKV_CHECK(length[i] >= 0, "length must be >= 0, got ", length[i], " at flat index ", i);
    // base <= pool_rows - length rather than base + length <= pool_rows: the sum of two huge values overflows
    HEADKV_CHECK(length[i] == 0 || (length[i] <= pool_rows && base[i] >= 0 && base[i] <= pool_rows - length[i]),
                 "rows base .. base + length (base ", base[i], ", length ", length[i], ") at flat (sequence, head) index ",
                 i, " fall outside the pools' ", pool_rows, " rows");
  }
}

// ---- conversions ------------------------------------------------------------------------------------------

HEADKV_INLINE float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

HEADKV_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half -> float, exact for every input (inf and NaN included), without branches so that loops over it
// vectorize with any SIMD ISA: the half's exponent and mantissa are moved into a float and rescaled by
// 2^-112; subnormal halves are built as (magic + mantissa) - magic. (The method of the FP16 library.)
HEADKV_INLINE float fp16_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t normal_bits = (two_w >> 4) + (0xE0u << 23);
  float normal, subnormal;
  std::memcpy(&normal, &normal_bits, sizeof normal);
  normal *= 0x1.0p-112f;
  const uint32_t subnormal_bits = (two_w >> 17) | (126u << 23);
  std::memcpy(&subnormal, &subnormal_bits, sizeof subnormal);
  subnormal -= 0.5f;
  uint32_t normal_u, subnormal_u;
  std::memcpy(&normal_u, &normal, sizeof normal_u);
  std::memcpy(&subnormal_u, &subnormal, sizeof subnormal_u);
  const uint32_t u = sign | (two_w < (1u << 27) ? subnormal_u : normal_u);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_fp16_bits(float f) {  // portable float -> IEEE half, round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (abs < 0x38800000u) {                         // subnormal or zero in fp16
    if (abs < 0x33000000u) return sign;
    const uint32_t shift = 126u - (abs >> 23);     // value / 2^-24 = mantissa / 2^shift
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t half = ((abs - 0x38000000u) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

// Storage<dtype>: the element type T of a buffer and its conversions. fp16 uses the compiler's _Float16 where
// the ISA converts it natively (aarch64); on x86-64 the baseline ISA has no conversion instructions and gcc
// does not vectorize _Float16 loads, so there fp16 is bits (the AVX2 build converts whole tiles with F16C).
template <int kDtype>
struct Storage;

template <>
struct Storage<kFloat32> {
  using T = float;
  static HEADKV_INLINE float load(T x) { return x; }
  static HEADKV_INLINE T store(float x) { return x; }
};

template <>
struct Storage<kBFloat16> {
  using T = uint16_t;
  static HEADKV_INLINE float load(T x) { return bf16_to_float(x); }
  static HEADKV_INLINE T store(float x) { return float_to_bf16(x); }
};

template <>
struct Storage<kFloat16> {
#if defined(__FLT16_MAX__) && !defined(__x86_64__) && !defined(__i386__)
  using T = _Float16;
  static HEADKV_INLINE float load(T x) { return static_cast<float>(x); }
  static HEADKV_INLINE T store(float x) { return static_cast<T>(x); }
#else
  using T = uint16_t;
  static HEADKV_INLINE float load(T x) { return fp16_bits_to_float(x); }
  static HEADKV_INLINE T store(float x) { return float_to_fp16_bits(x); }
#endif
};

inline float fp16_to_float(uint16_t h) {
  typename Storage<kFloat16>::T x;
  std::memcpy(&x, &h, sizeof h);
  return Storage<kFloat16>::load(x);
}

inline uint16_t float_to_fp16(float f) {
  const typename Storage<kFloat16>::T x = Storage<kFloat16>::store(f);
  uint16_t h;
  std::memcpy(&h, &x, sizeof h);
  return h;
}

template <class S>
HEADKV_INLINE void load_typed(const typename S::T* __restrict src, int64_t n, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = S::load(src[i]);
}

template <class S>
HEADKV_INLINE void store_typed(const float* __restrict in, int64_t n, typename S::T* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = S::store(in[i]);
}

// Values offset .. offset + n of a buffer of `dtype`, converted to fp32 into `out`.
HEADKV_INLINE void load_values(const void* base, int dtype, int64_t offset, int64_t n, float* __restrict out) {
  if (dtype == kFloat32) {
    std::memcpy(out, static_cast<const float*>(base) + offset, n * sizeof(float));
  } else if (dtype == kBFloat16) {
    load_typed<Storage<kBFloat16>>(static_cast<const uint16_t*>(base) + offset, n, out);
  } else {
    load_typed<Storage<kFloat16>>(static_cast<const Storage<kFloat16>::T*>(base) + offset, n, out);
  }
}

// Row `row` (n values) of a buffer of `dtype`, converted to fp32 into `out`.
HEADKV_INLINE void load_row(const void* base, int dtype, int64_t row, int64_t n, float* __restrict out) {
  load_values(base, dtype, row * n, n, out);
}

#ifdef HEADKV_AVX2_CLONE
// fp16 -> fp32 with F16C, 8 values per instruction (gcc does not vectorize _Float16 conversions without
// AVX512-FP16). Called, never inlined, from code that runs only where the CPU has AVX2/FMA/F16C.
HEADKV_TARGET_AVX2 inline void fp16_to_float_f16c(const uint16_t* __restrict src, int64_t n, float* __restrict out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) out[i] = _cvtsh_ss(src[i]);
}
#endif

// load_values for code compiled twice: kAvx2 = true only in the AVX2/FMA/F16C build.
template <bool kAvx2>
HEADKV_INLINE void load_values_isa(const void* base, int dtype, int64_t offset, int64_t n, float* __restrict out) {
#ifdef HEADKV_AVX2_CLONE
  if constexpr (kAvx2) {
    if (dtype == kFloat16) return fp16_to_float_f16c(static_cast<const uint16_t*>(base) + offset, n, out);
  }
#endif
  load_values(base, dtype, offset, n, out);
}

// fp32 values `in` converted to `dtype` into row `row` of a buffer.
HEADKV_INLINE void store_row(void* base, int dtype, int64_t row, int64_t n, const float* __restrict in) {
  if (dtype == kFloat32) {
    std::memcpy(static_cast<float*>(base) + row * n, in, n * sizeof(float));
  } else if (dtype == kBFloat16) {
    store_typed<Storage<kBFloat16>>(in, n, static_cast<uint16_t*>(base) + row * n);
  } else {
    store_typed<Storage<kFloat16>>(in, n, static_cast<Storage<kFloat16>::T*>(base) + row * n);
  }
}

// ---- inner loops (fp32 accumulation) ----------------------------------------------------------------------

HEADKV_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

HEADKV_INLINE void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

HEADKV_INLINE void scale_row(float alpha, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

// s[r] = q . rows[r] for the 4 rows starting at `rows` (row stride n), stored as S.
template <class S>
HEADKV_INLINE void dot4(const float* __restrict q, const typename S::T* __restrict rows, int64_t n,
                        float* __restrict s) {
  const typename S::T* __restrict r0 = rows;
  const typename S::T* __restrict r1 = rows + n;
  const typename S::T* __restrict r2 = rows + 2 * n;
  const typename S::T* __restrict r3 = rows + 3 * n;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const float x = q[i];
    s0 += x * S::load(r0[i]);
    s1 += x * S::load(r1[i]);
    s2 += x * S::load(r2[i]);
    s3 += x * S::load(r3[i]);
  }
  s[0] = s0;
  s[1] = s1;
  s[2] = s2;
  s[3] = s3;
}

template <class S>
HEADKV_INLINE float dot1(const float* __restrict q, const typename S::T* __restrict row, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += q[i] * S::load(row[i]);
  return s;
}

// acc += sum_r p[r] * rows[r] over the 4 rows starting at `rows` (row stride n), stored as S.
template <class S>
HEADKV_INLINE void axpy4(const float* __restrict p, const typename S::T* __restrict rows, int64_t n,
                         float* __restrict acc) {
  const typename S::T* __restrict r0 = rows;
  const typename S::T* __restrict r1 = rows + n;
  const typename S::T* __restrict r2 = rows + 2 * n;
  const typename S::T* __restrict r3 = rows + 3 * n;
  const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += p0 * S::load(r0[i]) + p1 * S::load(r1[i]) + p2 * S::load(r2[i]) + p3 * S::load(r3[i]);
  }
}

template <class S>
HEADKV_INLINE void axpy1(float p, const typename S::T* __restrict row, int64_t n, float* __restrict acc) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += p * S::load(row[i]);
}

// exp(x) for x <= 0 (a score minus its running max), within about 2e-7 relative error; exactly 0 below -87
// (so a masked score, -inf, gets no weight) and NaN for NaN (a NaN score poisons its row, as in torch.softmax):
// a polynomial with no calls, so loops over it vectorize.
HEADKV_INLINE float exp_le0(float x) {
  const bool in_range = x >= -87.0f;                       // false below -87, for -inf and for NaN
  const uint32_t keep = in_range ? 0xffffffffu : 0u;       // all ones, or 0.f as the result
  const float xc = in_range ? x : -87.0f;                  // finite: the conversion to int below is defined
  const int32_t n = static_cast<int32_t>(xc * 1.44269504088896341f - 0.5f);  // nearest integer to x / ln 2
  const float nf = static_cast<float>(n);
  const float r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = (static_cast<uint32_t>(n + 127) << 23) & keep;  // 2^n, or 0.f (n + 127 >= 1 here)
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float y = p * two_n;
  return x == x ? y : x;  // (-fno-finite-math-only keeps this NaN test)
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace headkv
