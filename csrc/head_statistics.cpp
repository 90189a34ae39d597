// head_statistics on the CPU: per-head attention statistics of a block of queries.
// Semantics: headkv_engine/ops/statistics.py (head_statistics_reference).
//
// One head per OpenMP task. Its keys are converted once to fp32 and transposed ([head_dim, keys]). Queries go
// in blocks of kQueryBlock; a block's score rows over keys 0..t of its last query (the only score buffer,
// kQueryBlock x keys floats: never a [T, T] matrix) come from a register tile of kQueryBlock x kKeyBlock sums.
// Each row then takes two passes: its max, then exp, the normaliser and sum p * logit (fp64). Regions and
// histogram bins are contiguous key ranges, summed in fp64. The per-head code is compiled twice, for AVX2/FMA
// (chosen at run time where the CPU has it) and for the baseline ISA, so one build serves every x86-64 CPU.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

constexpr int64_t kRelativeBins = 64;
constexpr int64_t kSinkSizes[] = {1, 2, 4, 8, 16};
constexpr int64_t kNumSinkSizes = 5;
constexpr int64_t kQueryBlock = 4;  // queries per block: rows of the score tile
constexpr int64_t kKeyBlock = 16;   // keys per tile; the transposed keys are padded to a multiple of it
// field offsets: count, entropy, entropy_sq, max_prob, uniformity, regions[4], relative[64], sinks[5], log2[...]
constexpr int64_t kRegions = 5, kRelative = 9, kSinks = 9 + kRelativeBins, kLog2 = 9 + kRelativeBins + kNumSinkSizes;

struct Args {
  const void* q;
  const void* k;
  int64_t tokens_q, tokens_k, head_dim, stride, q_start, first_query, sink_size, local_window, log2_bins, fields;
  int dtype;
  float scale;
  double recent_ratio;
  double* sums;
};

struct Workspace {
  std::vector<float> keys_t, queries, key, rows;
  explicit Workspace(const Args& a)
      : keys_t(a.head_dim * a.stride), queries(kQueryBlock * a.head_dim), key(a.head_dim),
        rows(kQueryBlock * a.stride) {}
};

// rows[r][j] = sum_d q[r][d] * keys_t[d][j] for r < kQueryBlock and j < n (a multiple of kKeyBlock).
HEADKV_INLINE void score_rows(const float* q, const float* keys_t, int64_t stride, int64_t head_dim, int64_t n,
                              float* rows) {
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    float acc[kQueryBlock][kKeyBlock] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const float* k = keys_t + d * stride + j0;
      for (int64_t r = 0; r < kQueryBlock; ++r) {
        const float a = q[r * head_dim + d];
#pragma omp simd
        for (int64_t c = 0; c < kKeyBlock; ++c) acc[r][c] += a * k[c];
      }
    }
    for (int64_t r = 0; r < kQueryBlock; ++r) std::copy(acc[r], acc[r] + kKeyBlock, rows + r * stride + j0);
  }
}

HEADKV_INLINE double range_sum(const float* e, int64_t lo, int64_t hi) {  // keys [lo, hi)
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = lo; j < hi; ++j) acc += e[j];
  return acc;
}

// Adds the statistics of the query at position t, whose scores are row[0..t], to out; row becomes exp(score - max).
HEADKV_INLINE void add_row(float* row, int64_t t, const Args& a, double* out) {
  float m = kNegInf;  // pass 1: the row max
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j <= t; ++j) m = row[j] > m ? row[j] : m;
  double l = 0.0, weighted_logit = 0.0;  // pass 2: normaliser and sum e * (score - max)
#pragma omp simd reduction(+ : l, weighted_logit)
  for (int64_t j = 0; j <= t; ++j) {
    const float shifted = row[j] - m;
    const float e = exp_le0(shifted);
    row[j] = e;
    l += e;
    weighted_logit += static_cast<double>(e) * shifted;
  }
  const double inv = 1.0 / l;
  const double entropy = std::log(l) - weighted_logit * inv;
  auto mass = [&](int64_t lo, int64_t hi) {  // probability of keys [lo, hi), clipped to [0, t]
    lo = std::max<int64_t>(lo, 0);
    hi = std::min<int64_t>(hi, t + 1);
    return lo < hi ? range_sum(row, lo, hi) * inv : 0.0;
  };
  const int64_t sink_end = std::min(a.sink_size, t + 1);
  const int64_t local_begin = std::max(sink_end, t - a.local_window + 1);
  const int64_t recent_begin =
      std::max(sink_end, t + 1 - static_cast<int64_t>(std::ceil(a.recent_ratio * static_cast<double>(t + 1))));
  const double sink_mass = mass(0, sink_end), local_mass = mass(local_begin, t + 1);
  const double recent_mass = mass(recent_begin, local_begin);
  out[kRegions + 0] += sink_mass;
  out[kRegions + 1] += local_mass;
  out[kRegions + 2] += recent_mass;
  out[kRegions + 3] += std::max(0.0, 1.0 - sink_mass - local_mass - recent_mass);
  for (int64_t d = 0; d < kRelativeBins - 1 && d <= t; ++d) out[kRelative + d] += row[t - d] * inv;
  out[kRelative + kRelativeBins - 1] += mass(0, t - (kRelativeBins - 1) + 1);
  out[kLog2] += row[t] * inv;  // distance 0
  for (int64_t b = 1; b < a.log2_bins; ++b) {  // distances [2^(b-1), 2^b); the last bin takes the rest
    const int64_t near = t - (int64_t{1} << (b - 1));
    if (near < 0) break;
    const int64_t far = b == a.log2_bins - 1 ? 0 : t - (int64_t{1} << b) + 1;
    out[kLog2 + b] += mass(far, near + 1);
  }
  for (int64_t z = 0; z < kNumSinkSizes; ++z) out[kSinks + z] += mass(0, kSinkSizes[z]);
  out[0] += 1.0;
  out[1] += entropy;
  out[2] += entropy * entropy;
  out[3] += inv;  // the largest probability is exp(0) / l
  out[4] += std::log(static_cast<double>(t + 1)) - entropy;
}

HEADKV_INLINE void head_body(const Args& a, int64_t h, Workspace& w) {
  double* out = a.sums + h * a.fields;
  std::fill(out, out + a.fields, 0.0);
  float* keys_t = w.keys_t.data();
  for (int64_t j = 0; j < a.tokens_k; ++j) {
    load_row(a.k, a.dtype, h * a.tokens_k + j, a.head_dim, w.key.data());
    for (int64_t d = 0; d < a.head_dim; ++d) keys_t[d * a.stride + j] = w.key[d];
  }
  for (int64_t d = 0; d < a.head_dim; ++d) {  // zero padding: the tile reads whole key blocks
    std::fill(keys_t + d * a.stride + a.tokens_k, keys_t + (d + 1) * a.stride, 0.f);
  }
  for (int64_t i0 = a.first_query; i0 < a.tokens_q; i0 += kQueryBlock) {
    const int64_t block = std::min(kQueryBlock, a.tokens_q - i0);
    std::fill(w.queries.begin(), w.queries.end(), 0.f);
    for (int64_t r = 0; r < block; ++r) {
      float* qr = w.queries.data() + r * a.head_dim;
      load_row(a.q, a.dtype, h * a.tokens_q + i0 + r, a.head_dim, qr);
      scale_row(a.scale, qr, a.head_dim);
    }
    const int64_t keys = a.q_start + i0 + block;  // keys 0..t of the block's last query
    score_rows(w.queries.data(), keys_t, a.stride, a.head_dim, (keys + kKeyBlock - 1) / kKeyBlock * kKeyBlock,
               w.rows.data());
    for (int64_t r = 0; r < block; ++r) add_row(w.rows.data() + r * a.stride, a.q_start + i0 + r, a, out);
  }
}

void head_baseline(const Args& a, int64_t h, Workspace& w) { head_body(a, h, w); }

#ifdef HEADKV_AVX2_CLONE
HEADKV_TARGET_AVX2 void head_avx2(const Args& a, int64_t h, Workspace& w) { head_body(a, h, w); }
#endif

using HeadFn = void (*)(const Args&, int64_t, Workspace&);

HeadFn pick_head_fn() {
#ifdef HEADKV_AVX2_CLONE
  if (use_avx2()) return head_avx2;
#endif
  return head_baseline;
}

}  // namespace

int64_t head_statistics_fields(int64_t log2_bins) { return kLog2 + log2_bins; }

void head_statistics(const void* q, const void* k, int64_t heads, int64_t tokens_q, int64_t tokens_k,
                     int64_t head_dim, int dtype, int64_t q_start, float scale, int64_t sink_size,
                     int64_t local_window, double recent_ratio, int64_t min_query, int64_t log2_bins, double* sums) {
  check_dtype(dtype, "q");
  check_positive(head_dim, "head_dim");
  check_positive(log2_bins, "log2_bins");
  check_non_negative(q_start, "q_start");
  check_non_negative(sink_size, "sink_size");
  check_non_negative(min_query, "min_query");
  check_positive(local_window, "local_window");
  HEADKV_CHECK(recent_ratio >= 0.0 && recent_ratio <= 1.0, "recent_ratio must be in [0, 1], got ", recent_ratio);
  if (tokens_k != q_start + tokens_q) throw std::invalid_argument("k must hold every key up to the last query");
  const Args a{q, k, tokens_q, tokens_k, head_dim, (tokens_k + kKeyBlock - 1) / kKeyBlock * kKeyBlock, q_start,
               std::max<int64_t>(0, min_query - q_start), sink_size, local_window, log2_bins,
               head_statistics_fields(log2_bins), dtype, scale, recent_ratio, sums};
  if (a.first_query >= tokens_q) {  // no query counts: zero sums, without converting a single key
    std::fill(sums, sums + heads * a.fields, 0.0);
    return;
  }
  const HeadFn run_head = pick_head_fn();
  std::vector<Workspace> workspaces = thread_workspaces<Workspace>("head_statistics", heads, a);
#pragma omp parallel num_threads(static_cast<int>(workspaces.size()))
  {
    Workspace& w = workspaces[thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t h = 0; h < heads; ++h) run_head(a, h, w);
  }
}

}  // namespace headkv
