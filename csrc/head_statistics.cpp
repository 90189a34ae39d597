// head_statistics on the CPU: per-head attention statistics of a block of queries, two passes over the keys.
// Semantics: headkv_engine/ops/statistics.py (head_statistics_reference).
//
// For each head (one thread each) and query: pass 1 computes the query's row of scores (one row is all that is
// held, never a [T, T] matrix) with its max, pass 2 turns it into probabilities and adds them to the head's
// sums. Regions and histogram bins are contiguous ranges of keys, so every statistic is a range sum. The
// sums are fp64.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

constexpr int64_t kRelativeBins = 64;
constexpr int64_t kSinkSizes[] = {1, 2, 4, 8, 16};
constexpr int64_t kNumSinkSizes = 5;

}  // namespace

int64_t head_statistics_fields(int64_t log2_bins) { return 5 + 4 + kRelativeBins + kNumSinkSizes + log2_bins; }

void head_statistics(const void* q, const void* k, int64_t heads, int64_t tokens_q, int64_t tokens_k,
                     int64_t head_dim, int dtype, int64_t q_start, float scale, int64_t sink_size,
                     int64_t local_window, double recent_ratio, int64_t min_query, int64_t log2_bins, double* sums) {
  check_dtype(dtype, "q");
  check_positive(head_dim, "head_dim");
  if (tokens_k != q_start + tokens_q) throw std::invalid_argument("k must hold every key up to the last query");
  const int64_t fields = head_statistics_fields(log2_bins);
  // field offsets: count, entropy, entropy_sq, max_prob, uniformity, regions[4], relative[64], sinks[5], log2[...]
  constexpr int64_t kRegions = 5, kRelative = 9, kSinks = 9 + kRelativeBins, kLog2 = 9 + kRelativeBins + 5;

#pragma omp parallel
  {
    std::vector<float> keys(tokens_k * head_dim), qf(head_dim), e(tokens_k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t h = 0; h < heads; ++h) {
      double* out = sums + h * fields;
      std::fill(out, out + fields, 0.0);
      for (int64_t j = 0; j < tokens_k; ++j) load_row(k, dtype, h * tokens_k + j, head_dim, keys.data() + j * head_dim);
      for (int64_t i = std::max<int64_t>(0, min_query - q_start); i < tokens_q; ++i) {
        const int64_t t = q_start + i;
        load_row(q, dtype, h * tokens_q + i, head_dim, qf.data());
        // the query's row of scores (one row at a time), its max and normaliser
        float m = kNegInf;
        for (int64_t j = 0; j <= t; ++j) {
          e[j] = dot(qf.data(), keys.data() + j * head_dim, head_dim) * scale;
          m = std::max(m, e[j]);
        }
        double l = 0.0, weighted_logit = 0.0;
        for (int64_t j = 0; j <= t; ++j) {
          const float shifted = e[j] - m;
          e[j] = std::exp(shifted);
          l += e[j];
          weighted_logit += static_cast<double>(e[j]) * shifted;
        }
        const double inv = 1.0 / l;
        const double entropy = std::log(l) - weighted_logit * inv;
        // regions, histograms and sink masses are sums of probabilities over ranges of keys
        auto mass = [&](int64_t lo, int64_t hi) {  // keys [lo, hi), clipped to [0, t]
          lo = std::max<int64_t>(lo, 0);
          hi = std::min<int64_t>(hi, t + 1);
          double acc = 0.0;
          for (int64_t j = lo; j < hi; ++j) acc += e[j];
          return acc * inv;
        };
        const int64_t sink_end = std::min(sink_size, t + 1);
        const int64_t local_begin = std::max(sink_end, t - local_window + 1);
        const int64_t recent_begin = std::max(sink_end, t + 1 - static_cast<int64_t>(std::ceil(recent_ratio * (t + 1))));
        const double sink_mass = mass(0, sink_end), local_mass = mass(local_begin, t + 1);
        const double recent_mass = recent_begin < local_begin ? mass(recent_begin, local_begin) : 0.0;
        out[kRegions + 0] += sink_mass;
        out[kRegions + 1] += local_mass;
        out[kRegions + 2] += recent_mass;
        out[kRegions + 3] += std::max(0.0, 1.0 - sink_mass - local_mass - recent_mass);
        for (int64_t d = 0; d < kRelativeBins - 1 && d <= t; ++d) out[kRelative + d] += e[t - d] * inv;
        out[kRelative + kRelativeBins - 1] += mass(0, t - (kRelativeBins - 1) + 1);
        out[kLog2] += e[t] * inv;  // distance 0
        for (int64_t b = 1; b < log2_bins; ++b) {  // distances [2^(b-1), 2^b); the last bin takes the rest
          const int64_t near = t - (int64_t{1} << (b - 1));
          if (near < 0) break;
          const int64_t far = b == log2_bins - 1 ? 0 : t - (int64_t{1} << b) + 1;
          out[kLog2 + b] += mass(far, near + 1);
        }
        for (int64_t z = 0; z < kNumSinkSizes; ++z) out[kSinks + z] += mass(0, kSinkSizes[z]);
        out[0] += 1.0;
        out[1] += entropy;
        out[2] += entropy * entropy;
        out[3] += inv;  // the largest probability is exp(0) / l
        out[4] += std::log(static_cast<double>(t + 1)) - entropy;
      }
    }
  }
}

}  // namespace headkv
