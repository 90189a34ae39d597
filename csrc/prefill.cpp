// prefill_attention on the CPU: a block of new queries under each head's sink / window mask.
// Semantics: headkv_engine/ops/prefill.py (prefill_attention_reference).
//
// Work items are (sequence, head, block of kQueries queries). Each visits the head's cached rows, then only
// the tiles of the block's own keys that meet the sink range [0, S) or the window (t_first - W, t_last] of
// its queries (positions increase along the block, so both are column ranges found by binary search): a
// windowed head costs O(T * (S + W)) rather than O(T^2). A tile of up to kKeys keys (read in place when fp32,
// else converted once) serves every query of the block: the scores [keys, queries] come from register tiles
// of kRows keys x kQueries queries (the block's queries are transposed once), the mask is applied only to
// tiles that some query does not fully see, the online softmax runs vectorised across the block's queries,
// and P.V from register tiles of kRows queries x kLanes columns. fp32 accumulation throughout.
// The per-item code is compiled for the baseline ISA and for AVX2/FMA/F16C.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

constexpr int64_t kQueries = 16;  // queries per work item: the lanes of the softmax state
constexpr int64_t kKeys = 64;     // keys per tile
constexpr int64_t kRows = 4;      // keys (scores) or queries (P.V) per register tile
constexpr int64_t kLanes = 16;    // columns per register tile of P.V

struct Args {
  const void *q, *q_sink, *k, *v;
  const int64_t* positions;
  const void *k_pool, *v_pool;
  const int64_t *pos_pool, *base, *length, *sink_size, *window_size;
  const float* fill;
  void* out;
  int64_t heads, tokens, head_dim, padded_dim, blocks;
  int q_dtype, kv_dtype;
  float scale;
};

struct Workspace {
  // q_t, q_sink_t: [head_dim, kQueries] (scaled, transposed); acc: [kQueries, padded_dim]; keys: [kKeys, head_dim];
  // values: [kKeys, padded_dim]; scores, sink_scores: [kKeys, kQueries]; per query: max, sum, qpos
  std::vector<float> q_t, q_sink_t, acc, keys, values, scores, sink_scores, max, sum, row;
  std::vector<int64_t> qpos;
  explicit Workspace(const Args& a)
      : q_t(a.head_dim * kQueries), q_sink_t(a.head_dim * kQueries), acc(kQueries * a.padded_dim),
        keys(kKeys * a.head_dim), values(kKeys * a.padded_dim), scores(kKeys * kQueries),
        sink_scores(kKeys * kQueries), max(kQueries), sum(kQueries), row(a.head_dim), qpos(kQueries) {}
};

// scores[j][i] = keys[j] . q_t[:, i] for keys [0, n) (rows of stride d) and the kQueries queries.
HEADKV_INLINE void score_tile(const float* q_t, const float* keys, int64_t d, int64_t n, float* scores) {
  int64_t j0 = 0;
  for (; j0 + kRows <= n; j0 += kRows) {
    float acc[kRows][kQueries] = {};
    for (int64_t c = 0; c < d; ++c) {
      const float* q = q_t + c * kQueries;
      for (int64_t r = 0; r < kRows; ++r) {
        const float x = keys[(j0 + r) * d + c];
#pragma omp simd
        for (int64_t l = 0; l < kQueries; ++l) acc[r][l] += x * q[l];
      }
    }
    for (int64_t r = 0; r < kRows; ++r) std::copy(acc[r], acc[r] + kQueries, scores + (j0 + r) * kQueries);
  }
  for (; j0 < n; ++j0) {
    float acc[kQueries] = {};
    for (int64_t c = 0; c < d; ++c) {
      const float* q = q_t + c * kQueries;
      const float x = keys[j0 * d + c];
#pragma omp simd
      for (int64_t l = 0; l < kQueries; ++l) acc[l] += x * q[l];
    }
    std::copy(acc, acc + kQueries, scores + j0 * kQueries);
  }
}

// acc[i] += sum_j p[j][i] * values[j] for the kQueries queries (acc rows of stride pd) and keys [0, n).
HEADKV_INLINE void value_tile(const float* p, const float* values, int64_t n, int64_t pd, float* acc) {
  for (int64_t i0 = 0; i0 < kQueries; i0 += kRows) {
    for (int64_t c0 = 0; c0 < pd; c0 += kLanes) {
      float out[kRows][kLanes];
      for (int64_t r = 0; r < kRows; ++r) std::copy(acc + (i0 + r) * pd + c0, acc + (i0 + r) * pd + c0 + kLanes, out[r]);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = values + j * pd + c0;
        for (int64_t r = 0; r < kRows; ++r) {
          const float w = p[j * kQueries + i0 + r];
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) out[r][l] += w * v[l];
        }
      }
      for (int64_t r = 0; r < kRows; ++r) std::copy(out[r], out[r] + kLanes, acc + (i0 + r) * pd + c0);
    }
  }
}

// Online-softmax update of the block's queries with keys / values rows [first, first + n) of k_src / v_src
// (dtype), at positions key_pos.
template <bool kAvx2>
HEADKV_INLINE void attend_tile(const Args& a, Workspace& w, const void* k_src, const void* v_src, int dtype,
                               int64_t first, int64_t n, const int64_t* key_pos, int64_t sink, int64_t window) {
  const int64_t d = a.head_dim, pd = a.padded_dim;
  // keys as fp32 rows (the source itself when it is fp32), values as rows of padded_dim columns
  const float* keys = w.keys.data();
  if (dtype == kFloat32) {
    keys = static_cast<const float*>(k_src) + first * d;
  } else {
    load_values_isa<kAvx2>(k_src, dtype, first * d, n * d, w.keys.data());
  }
  const float* values = w.values.data();
  if (dtype == kFloat32 && pd == d) {
    values = static_cast<const float*>(v_src) + first * d;
  } else if (pd == d) {
    load_values_isa<kAvx2>(v_src, dtype, first * d, n * d, w.values.data());
  } else {
    for (int64_t j = 0; j < n; ++j) load_values_isa<kAvx2>(v_src, dtype, (first + j) * d, d, w.values.data() + j * pd);
  }

  float* s = w.scores.data();
  score_tile(w.q_t.data(), keys, d, n, s);
  const int64_t* qpos = w.qpos.data();
  int64_t key_min = key_pos[0], key_max = key_pos[0], t_min = qpos[0], t_max = qpos[0];
  bool sink_keys = false;
  for (int64_t j = 0; j < n; ++j) {
    key_min = std::min(key_min, key_pos[j]);
    key_max = std::max(key_max, key_pos[j]);
    sink_keys |= key_pos[j] >= 0 && key_pos[j] < sink;
  }
  for (int64_t i = 0; i < kQueries; ++i) {
    t_min = std::min(t_min, qpos[i]);
    t_max = std::max(t_max, qpos[i]);
  }
  if (sink_keys && a.q_sink != nullptr) {  // keys at positions < S are scored with q_sink
    score_tile(w.q_sink_t.data(), keys, d, n, w.sink_scores.data());
    for (int64_t j = 0; j < n; ++j) {
      if (key_pos[j] >= 0 && key_pos[j] < sink) {
        std::copy(w.sink_scores.data() + j * kQueries, w.sink_scores.data() + (j + 1) * kQueries, s + j * kQueries);
      }
    }
  }
  // mask, unless every query (all real) sees every key of the tile
  if (!(t_min >= 0 && key_min >= 0 && key_max <= t_min && (key_max < sink || key_min > t_max - window))) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = key_pos[j];
      for (int64_t i = 0; i < kQueries; ++i) {
        const int64_t t = qpos[i];
        const bool seen = p >= 0 && p <= t && (p < sink || p > t - window);
        s[j * kQueries + i] = seen ? s[j * kQueries + i] : kNegInf;
      }
    }
  }
  // online softmax, vectorised over the queries
  float tile_max[kQueries], m_new[kQueries], correction[kQueries], tile_sum[kQueries];
  std::fill(tile_max, tile_max + kQueries, kNegInf);
  for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < kQueries; ++i) tile_max[i] = std::max(tile_max[i], s[j * kQueries + i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < kQueries; ++i) {
    const float m = std::max(w.max[i], tile_max[i]);
    m_new[i] = m == kNegInf ? 0.f : m;  // a query with no key yet: every weight is exp(-inf) = 0
    correction[i] = exp_le0(w.max[i] - m_new[i]);
    w.max[i] = m;
    tile_sum[i] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    float* row = s + j * kQueries;
#pragma omp simd
    for (int64_t i = 0; i < kQueries; ++i) {
      row[i] = exp_le0(row[i] - m_new[i]);
      tile_sum[i] += row[i];
    }
  }
  for (int64_t i = 0; i < kQueries; ++i) {
    w.sum[i] = w.sum[i] * correction[i] + tile_sum[i];
    if (correction[i] != 1.f) scale_row(correction[i], w.acc.data() + i * pd, pd);
  }
  value_tile(s, values, n, pd, w.acc.data());
}

template <bool kAvx2>
HEADKV_INLINE void block_body(const Args& a, int64_t item, Workspace& w) {
  const int64_t d = a.head_dim, pd = a.padded_dim, tokens = a.tokens;
  const int64_t bh = item / a.blocks, b = bh / a.heads, h = bh % a.heads;
  const int64_t m0 = (item % a.blocks) * kQueries;
  const int64_t count = std::min(kQueries, tokens - m0);
  const int64_t end = m0 + count;
  const int64_t* kpos = a.positions + b * tokens;  // this sequence's positions: -1 padding, then increasing
  const int64_t sink = a.sink_size[h], window = a.window_size[h];
  std::fill(w.max.begin(), w.max.end(), kNegInf);
  std::fill(w.sum.begin(), w.sum.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  for (int64_t i = 0; i < kQueries; ++i) w.qpos[i] = i < count ? kpos[m0 + i] : -1;  // -1: padding, no query
  const int64_t first_real = std::upper_bound(kpos, kpos + tokens, int64_t{-1}) - kpos;  // padding columns before
  if (end > first_real && (sink > 0 || window > 0)) {
    for (int64_t i = 0; i < count; ++i) {  // queries, scaled, transposed to [head_dim, kQueries]
      const int64_t src = (bh * tokens + m0 + i) * d;
      load_values_isa<kAvx2>(a.q, a.q_dtype, src, d, w.row.data());
      for (int64_t c = 0; c < d; ++c) w.q_t[c * kQueries + i] = w.row[c] * a.scale;
      if (a.q_sink) {
        load_values_isa<kAvx2>(a.q_sink, a.q_dtype, src, d, w.row.data());
        for (int64_t c = 0; c < d; ++c) w.q_sink_t[c * kQueries + i] = w.row[c] * a.scale;
      }
    }
    // 1. the head's cached rows (at most S + W for windowed heads)
    const int64_t rows = a.length[bh], row0 = a.base[bh];
    for (int64_t r0 = 0; r0 < rows; r0 += kKeys) {
      const int64_t n = std::min(kKeys, rows - r0);
      attend_tile<kAvx2>(a, w, a.k_pool, a.v_pool, a.kv_dtype, row0 + r0, n, a.pos_pool + row0 + r0, sink, window);
    }
    // 2. the block's own keys: columns with position < S, and those in (t_first - W, t_last] (up to `end`)
    const int64_t t_first = kpos[std::max(m0, first_real)];
    const int64_t* real_begin = kpos + first_real;
    const int64_t window_begin =
        window > 0 ? std::upper_bound(real_begin, kpos + end, t_first - window) - kpos : end;
    const int64_t sink_end = std::min<int64_t>(std::lower_bound(real_begin, kpos + end, sink) - kpos, window_begin);
    const int64_t ranges[2][2] = {{first_real, sink_end}, {window_begin, end}};
    for (const auto& range : ranges) {
      for (int64_t c0 = range[0]; c0 < range[1]; c0 += kKeys) {
        const int64_t n = std::min(kKeys, range[1] - c0);
        attend_tile<kAvx2>(a, w, a.k, a.v, a.q_dtype, bh * tokens + c0, n, kpos + c0, sink, window);
      }
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    float* row = w.acc.data() + i * pd;
    if (w.sum[i] != 0.f) {  // (a NaN sum, from a NaN input, stays NaN: never the fill)
      scale_row(1.f / w.sum[i], row, d);
    } else {  // no visible key (padding query, pruned head): the fill
      for (int64_t c = 0; c < d; ++c) row[c] = a.fill ? a.fill[h * d + c] : 0.f;
    }
    store_row(a.out, a.q_dtype, bh * tokens + m0 + i, d, row);
  }
}

void block_baseline(const Args& a, int64_t item, Workspace& w) { block_body<false>(a, item, w); }

#ifdef HEADKV_AVX2_CLONE
HEADKV_TARGET_AVX2 void block_avx2(const Args& a, int64_t item, Workspace& w) { block_body<true>(a, item, w); }
#endif

using BlockFn = void (*)(const Args&, int64_t, Workspace&);

BlockFn pick_block_fn() {
#ifdef HEADKV_AVX2_CLONE
  if (use_avx2()) return block_avx2;
#endif
  return block_baseline;
}

}  // namespace

void prefill_attention(const void* q, const void* q_sink, const void* k, const void* v, const int64_t* positions,
                       const void* k_pool, const void* v_pool, const int64_t* pos_pool, const int64_t* base,
                       const int64_t* length, const int64_t* sink_size, const int64_t* window_size, const float* fill,
                       void* out, int64_t batch, int64_t heads, int64_t tokens, int64_t head_dim, int64_t pool_rows,
                       int q_dtype, int kv_dtype, float scale) {
  check_dtype(q_dtype, "q");
  check_dtype(kv_dtype, "k_pool");
  check_positive(head_dim, "head_dim");
  check_non_negative(batch, "batch");
  check_non_negative(heads, "heads");
  check_non_negative(tokens, "tokens");
  check_non_negative(pool_rows, "pool_rows");
  if (batch * heads * tokens == 0) return;
  for (const void* p : {q, k, v, static_cast<const void*>(positions), static_cast<const void*>(base),
                        static_cast<const void*>(length), static_cast<const void*>(sink_size),
                        static_cast<const void*>(window_size), static_cast<const void*>(out)}) {
    check_pointer(p, "every tensor argument but q_sink and fill");
  }
  check_row_ranges(base, length, batch * heads, pool_rows);
  for (int64_t h = 0; h < heads; ++h) {
    HEADKV_CHECK(sink_size[h] >= 0 && window_size[h] >= 0, "sink_size and window_size must be >= 0, got ",
                 sink_size[h], " and ", window_size[h], " for head ", h);
  }
  for (int64_t b = 0; b < batch; ++b) {  // the key ranges of a query block come from binary searches
    const int64_t* p = positions + b * tokens;
    HEADKV_CHECK(p[0] >= -1, "positions must be >= -1, got ", p[0], " at [", b, ", 0]");
    for (int64_t i = 1; i < tokens; ++i) {
      HEADKV_CHECK(p[i] >= -1 && (p[i - 1] == -1 || p[i] > p[i - 1]), "positions[", b,
                   "] must be -1 (padding) at the start, then strictly increasing positions >= 0; got ", p[i - 1],
                   " then ", p[i], " at index ", i);
    }
  }

  const int64_t blocks = (tokens + kQueries - 1) / kQueries;
  const int64_t items = batch * heads * blocks;
  const int64_t padded_dim = (head_dim + kLanes - 1) / kLanes * kLanes;
  const Args a{q,      q_sink,    k,           v,    positions, k_pool,     v_pool,   pos_pool, base,     length,
               sink_size, window_size, fill, out,  heads,     tokens,     head_dim, padded_dim, blocks, q_dtype,
               kv_dtype, scale};
  const BlockFn run = pick_block_fn();
  std::vector<Workspace> workspaces = thread_workspaces<Workspace>("prefill_attention", items, a);
#pragma omp parallel num_threads(static_cast<int>(workspaces.size()))
  {
    Workspace& w = workspaces[thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) run(a, item, w);
  }
}

}  // namespace headkv
