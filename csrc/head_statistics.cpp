// head_statistics on the CPU: per-head attention statistics of a block of queries, two passes over the keys.
// Semantics: headkv_engine/ops/statistics.py (head_statistics_reference).
//
// For each head (one thread each) and block of kQueries queries: pass 1 finds every row's max and normaliser
// over the causal keys, pass 2 revisits the keys tile by tile and adds each probability to the head's sums.
// Only a [kQueries x kKeys] tile of scores is ever held; the sums are fp64.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

constexpr int64_t kQueries = 16;
constexpr int64_t kKeys = 128;
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
    std::vector<float> keys(tokens_k * head_dim), qf(kQueries * head_dim), s(kKeys);
    std::vector<float> row_max(kQueries);
    std::vector<double> row_sum(kQueries), entropy(kQueries), max_prob(kQueries);
#pragma omp for schedule(dynamic, 1)
    for (int64_t h = 0; h < heads; ++h) {
      double* out = sums + h * fields;
      std::fill(out, out + fields, 0.0);
      for (int64_t j = 0; j < tokens_k; ++j) load_row(k, dtype, h * tokens_k + j, head_dim, keys.data() + j * head_dim);
      const int64_t first = std::max<int64_t>(0, min_query - q_start);
      for (int64_t i0 = first; i0 < tokens_q; i0 += kQueries) {
        const int64_t count = std::min(kQueries, tokens_q - i0);
        for (int64_t i = 0; i < count; ++i) load_row(q, dtype, h * tokens_q + i0 + i, head_dim, qf.data() + i * head_dim);
        // pass 1: max and normaliser of every row
        for (int64_t i = 0; i < count; ++i) {
          const int64_t t = q_start + i0 + i;
          float m = kNegInf;
          double l = 0.0;
          for (int64_t j0 = 0; j0 <= t; j0 += kKeys) {
            const int64_t n = std::min(kKeys, t + 1 - j0);
            float tile_max = kNegInf;
            for (int64_t j = 0; j < n; ++j) {
              s[j] = dot(qf.data() + i * head_dim, keys.data() + (j0 + j) * head_dim, head_dim) * scale;
              tile_max = std::max(tile_max, s[j]);
            }
            if (tile_max > m) {
              l *= std::exp(static_cast<double>(m) - tile_max);
              m = tile_max;
            }
            for (int64_t j = 0; j < n; ++j) l += std::exp(static_cast<double>(s[j]) - m);
          }
          row_max[i] = m;
          row_sum[i] = l;
        }
        // pass 2: every probability into the sums
        for (int64_t i = 0; i < count; ++i) {
          const int64_t t = q_start + i0 + i;
          const double log_sum = std::log(row_sum[i]);
          const int64_t recent_start = t + 1 - static_cast<int64_t>(std::ceil(recent_ratio * (t + 1)));
          double plogp = 0.0, p_max = 0.0;
          for (int64_t j0 = 0; j0 <= t; j0 += kKeys) {
            const int64_t n = std::min(kKeys, t + 1 - j0);
            for (int64_t j = 0; j < n; ++j) {
              const int64_t key = j0 + j, distance = t - key;
              const double logit = static_cast<double>(
                  dot(qf.data() + i * head_dim, keys.data() + key * head_dim, head_dim) * scale) - row_max[i] - log_sum;
              const double p = std::exp(logit);
              plogp += p * logit;
              p_max = std::max(p_max, p);
              const int64_t region = key < sink_size ? 0 : distance < local_window ? 1 : key >= recent_start ? 2 : 3;
              out[kRegions + region] += p;
              out[kRelative + std::min(distance, kRelativeBins - 1)] += p;
              int64_t log_bin = 0;
              if (distance > 0) log_bin = 64 - __builtin_clzll(static_cast<unsigned long long>(distance));
              out[kLog2 + std::min(log_bin, log2_bins - 1)] += p;
              for (int64_t z = 0; z < kNumSinkSizes; ++z)
                if (key < kSinkSizes[z]) out[kSinks + z] += p;
            }
          }
          const double ent = -plogp;
          out[0] += 1.0;
          out[1] += ent;
          out[2] += ent * ent;
          out[3] += p_max;
          out[4] += std::log(static_cast<double>(t + 1)) - ent;
        }
      }
    }
  }
}

}  // namespace headkv
