// prefill_attention on the CPU: a block of new queries under each head's sink / window mask.
// Semantics: headkv_engine/ops/prefill.py (prefill_attention_reference).
//
// Work items are (sequence, head, block of kQueries queries). Each visits the head's cached rows, then only
// the tiles of the block's own keys that meet the sink range or the window of its queries (real columns map
// linearly to positions), so a windowed head costs O(T * (S + W)) rather than O(T^2).
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

constexpr int64_t kQueries = 16;
constexpr int64_t kKeys = 64;

struct QueryBlock {
  int64_t count, head_dim;
  const int64_t* positions;  // [count], -1 = padding
  int64_t sink, window;
  const float* q;            // [count, head_dim]
  const float* q_sink;       // [count, head_dim] or null
  float* max;                // [count]
  float* sum;                // [count]
  float* acc;                // [count, head_dim]
  float* scores;             // [count, kKeys]
};

// Online-softmax update of every query of `block` with `n` keys (fp32 rows) at positions `key_pos`.
void attend_tile(QueryBlock& block, const float* keys, const float* values, const int64_t* key_pos, int64_t n,
                 float scale) {
  const int64_t d = block.head_dim;
  for (int64_t i = 0; i < block.count; ++i) {
    const int64_t t = block.positions[i];
    if (t < 0) continue;
    float* s = block.scores + i * kKeys;
    float tile_max = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = key_pos[j];
      const bool seen = p >= 0 && p <= t && (p < block.sink || p > t - block.window);
      if (!seen) {
        s[j] = kNegInf;
        continue;
      }
      const float* qq = (block.q_sink && p < block.sink) ? block.q_sink + i * d : block.q + i * d;
      s[j] = dot(qq, keys + j * d, d) * scale;
      tile_max = std::max(tile_max, s[j]);
    }
    if (tile_max == kNegInf) continue;
    float* acc = block.acc + i * d;
    if (tile_max > block.max[i]) {
      const float correction = std::exp(block.max[i] - tile_max);
      block.sum[i] *= correction;
      scale_row(correction, acc, d);
      block.max[i] = tile_max;
    }
    for (int64_t j = 0; j < n; ++j) {
      if (s[j] == kNegInf) continue;
      const float p = std::exp(s[j] - block.max[i]);
      block.sum[i] += p;
      axpy(p, values + j * d, acc, d);
    }
  }
}

}  // namespace

void prefill_attention(const void* q, const void* q_sink, const void* k, const void* v, const int64_t* positions,
                       const void* k_pool, const void* v_pool, const int64_t* pos_pool, const int64_t* base,
                       const int64_t* length, const int64_t* sink_size, const int64_t* window_size, const float* fill,
                       void* out, int64_t batch, int64_t heads, int64_t tokens, int64_t head_dim, int q_dtype,
                       int kv_dtype, float scale) {
  check_dtype(q_dtype, "q");
  check_dtype(kv_dtype, "k_pool");
  check_positive(head_dim, "head_dim");
  if (tokens <= 0) return;
  const int64_t blocks = (tokens + kQueries - 1) / kQueries;
  const int64_t items = batch * heads * blocks;

#pragma omp parallel
  {
    std::vector<float> qf(kQueries * head_dim), qsf(kQueries * head_dim), acc(kQueries * head_dim);
    std::vector<float> mx(kQueries), sm(kQueries), scores(kQueries * kKeys);
    std::vector<float> kt(kKeys * head_dim), vt(kKeys * head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t bh = item / blocks, b = bh / heads, h = bh % heads;
      const int64_t m0 = (item % blocks) * kQueries;
      const int64_t count = std::min(kQueries, tokens - m0);
      const int64_t* qpos = positions + b * tokens + m0;
      const int64_t sink = sink_size[h], window = window_size[h];
      for (int64_t i = 0; i < count; ++i) {
        load_row(q, q_dtype, bh * tokens + m0 + i, head_dim, qf.data() + i * head_dim);
        if (q_sink) load_row(q_sink, q_dtype, bh * tokens + m0 + i, head_dim, qsf.data() + i * head_dim);
      }
      std::fill(mx.begin(), mx.end(), kNegInf);
      std::fill(sm.begin(), sm.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      QueryBlock block{count, head_dim, qpos, sink, window, qf.data(), q_sink ? qsf.data() : nullptr,
                       mx.data(), sm.data(), acc.data(), scores.data()};

      // 1. the head's cached rows (at most S + W for windowed heads)
      const int64_t rows = length[bh];
      for (int64_t r0 = 0; r0 < rows; r0 += kKeys) {
        const int64_t n = std::min(kKeys, rows - r0);
        for (int64_t j = 0; j < n; ++j) {
          load_row(k_pool, kv_dtype, base[bh] + r0 + j, head_dim, kt.data() + j * head_dim);
          load_row(v_pool, kv_dtype, base[bh] + r0 + j, head_dim, vt.data() + j * head_dim);
        }
        attend_tile(block, kt.data(), vt.data(), pos_pool + base[bh] + r0, n, scale);
      }

      // 2. the block's own keys: columns [0, sink_end) and [window_begin, m0 + count)
      const int64_t* kpos = positions + b * tokens;
      const int64_t offset = kpos[tokens - 1] - (tokens - 1);  // column = position - offset for real tokens
      const int64_t end = m0 + count;
      const int64_t window_begin = std::max<int64_t>(0, m0 - std::min(window, tokens) + 1);
      const int64_t sink_end = std::min(std::max<int64_t>(0, sink - offset), window_begin);
      const int64_t ranges[2][2] = {{0, sink_end}, {window_begin, end}};
      for (const auto& range : ranges) {
        for (int64_t c0 = range[0]; c0 < range[1]; c0 += kKeys) {
          const int64_t n = std::min(kKeys, range[1] - c0);
          for (int64_t j = 0; j < n; ++j) {
            load_row(k, q_dtype, bh * tokens + c0 + j, head_dim, kt.data() + j * head_dim);
            load_row(v, q_dtype, bh * tokens + c0 + j, head_dim, vt.data() + j * head_dim);
          }
          attend_tile(block, kt.data(), vt.data(), kpos + c0, n, scale);
        }
      }

      for (int64_t i = 0; i < count; ++i) {
        float* row = acc.data() + i * head_dim;
        if (sm[i] > 0.f) {
          scale_row(1.f / sm[i], row, head_dim);
        } else {  // no visible key (padding query, pruned head): the fill
          for (int64_t d = 0; d < head_dim; ++d) row[d] = fill ? fill[h * head_dim + d] : 0.f;
        }
        store_row(out, q_dtype, bh * tokens + m0 + i, head_dim, row);
      }
    }
  }
}

}  // namespace headkv
