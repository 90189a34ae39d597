// decode_attention on the CPU: one query per (sequence, head) over that head's kept rows of the ragged pools.
// Semantics: headkv_engine/ops/decode.py (decode_attention_reference).
//
// Work items are chunks of at most kChunk rows of one head, so a long full head is shared between threads
// while a window head is a single item (OpenMP dynamic schedule). An item makes one pass over its K and V
// rows, a tile of kTile rows at a time: scores of 4 rows per loop over head_dim (the query, pre-scaled, is
// loaded once for 4 keys), the tile max, exp of the tile as one vector loop, then the values 4 rows per
// loop into the fp32 accumulator; the running max / normaliser / output rescale once per tile (online
// softmax). Rows are read in their storage dtype and converted in registers. The items of a head are merged
// by their log-sum-exp. The per-item code is compiled for the baseline ISA and for AVX2/FMA/F16C (fp16 tiles
// are converted with F16C there).
//
// Optional step statistics (stats != nullptr): each item also sums e * (s - m), and e over the rows at positions
// < stat_sink and > query_position - stat_local (e = exp(s - m)); the merge turns them into the head's entropy,
// sink mass and local mass.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

constexpr int64_t kChunk = 512;
constexpr int64_t kTile = 64;

struct Args {
  const void* q;
  const void* q_sink;
  const void* k_pool;
  const void* v_pool;
  const int64_t* base;
  const int64_t* sink_size;
  int64_t heads, head_dim;
  int q_dtype, kv_dtype;
  float scale;
  const int64_t* pos_pool;  // non-null: the step statistics are wanted
  const int64_t* query_position;
  int64_t stat_sink, stat_local;
};

struct ItemStats {
  float shifted_sum = 0.f;  // sum of e * (s - m)
  float sink = 0.f, local = 0.f;  // sums of e over the sink / local rows
};

struct Item {
  int64_t bh, start, end;  // rows start..end of head bh's kept rows
};

struct Workspace {
  std::vector<float> q, q_sink, scores, tile;  // tile: fp16 rows widened with F16C (AVX2 build only)
  Workspace(int64_t head_dim, bool fp16)
      : q(head_dim), q_sink(head_dim), scores(kTile), tile(fp16 ? kTile * head_dim : 0) {}
};

// Scores of rows [lo, hi) of the tile at `keys` (row stride d) with query `q`.
template <class S>
HEADKV_INLINE void tile_scores(const float* q, const typename S::T* keys, int64_t lo, int64_t hi, int64_t d,
                               float* s) {
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) dot4<S>(q, keys + j * d, d, s + j);
  for (; j < hi; ++j) s[j] = dot1<S>(q, keys + j * d, d);
}

// acc += sum_j p[j] * values[j] over the n rows of a tile.
template <class S>
HEADKV_INLINE void tile_values(const float* p, const typename S::T* values, int64_t n, int64_t d, float* acc) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) axpy4<S>(p + j, values + j * d, d, acc);
  for (; j < n; ++j) axpy1<S>(p[j], values + j * d, d, acc);
}

// Online softmax over rows it.start..it.end of head it.bh: acc (unnormalised output), max and sum.
// S: the pools' storage; kD: head_dim when known at compile time (0: a.head_dim); kAvx2: the AVX2 build, in
// which fp16 tiles are converted to fp32 with F16C first (gcc cannot vectorize _Float16 loads there).
template <class S, int kD, bool kAvx2>
HEADKV_INLINE void chunk_body(const Args& a, const Item& it, Workspace& w, float* acc, float* max_out,
                              float* sum_out, ItemStats* stats) {
  using T = typename S::T;
  using F32 = Storage<kFloat32>;
  constexpr bool kConvertTile = kAvx2 && std::is_same_v<S, Storage<kFloat16>>;
  const int64_t d = kD > 0 ? kD : a.head_dim;
  const int64_t h = it.bh % a.heads;
  float* q = w.q.data();
  float* qs = w.q_sink.data();
  float* s = w.scores.data();
  load_row(a.q, a.q_dtype, it.bh, d, q);
  scale_row(a.scale, q, d);
  const int64_t sinks = a.q_sink ? std::max<int64_t>(0, a.sink_size[h]) : 0;
  if (it.start < sinks) {
    load_row(a.q_sink, a.q_dtype, it.bh, d, qs);
    scale_row(a.scale, qs, d);
  }
  std::fill(acc, acc + d, 0.f);
  float m = kNegInf, l = 0.f;
  ItemStats st;
  const int64_t* positions = a.pos_pool ? a.pos_pool + a.base[it.bh] : nullptr;
  const int64_t local_after = a.pos_pool ? a.query_position[it.bh / a.heads] - a.stat_local : 0;
  const T* k_rows = static_cast<const T*>(a.k_pool) + a.base[it.bh] * d;
  const T* v_rows = static_cast<const T*>(a.v_pool) + a.base[it.bh] * d;
  for (int64_t t0 = it.start; t0 < it.end; t0 += kTile) {
    const int64_t n = std::min(kTile, it.end - t0);
    const int64_t split = std::min(n, std::max<int64_t>(0, sinks - t0));  // rows [0, split) are sinks
    if constexpr (kConvertTile) {
      load_values_isa<kAvx2>(a.k_pool, a.kv_dtype, (a.base[it.bh] + t0) * d, n * d, w.tile.data());
      if (split > 0) tile_scores<F32>(qs, w.tile.data(), 0, split, d, s);
      tile_scores<F32>(q, w.tile.data(), split, n, d, s);
    } else {
      if (split > 0) tile_scores<S>(qs, k_rows + t0 * d, 0, split, d, s);
      tile_scores<S>(q, k_rows + t0 * d, split, n, d, s);
    }
    float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < n; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
    if (tile_max > m) {
      const float correction = std::exp(m - tile_max);  // 0 on the first tile (m = -inf, acc = 0)
      if (positions) {  // move the running sums from m to tile_max (the shift adds (m - tile_max) * l)
        st.shifted_sum = l > 0.f ? correction * (st.shifted_sum + (m - tile_max) * l) : 0.f;
        st.sink *= correction;
        st.local *= correction;
      }
      l *= correction;
      scale_row(correction, acc, d);
      m = tile_max;
    }
    if (positions) {
      for (int64_t j = 0; j < n; ++j) {
        const float x = s[j] - m, e = exp_le0(x);
        const int64_t pos = positions[t0 + j];
        st.shifted_sum += e * x;
        if (pos < a.stat_sink) st.sink += e;
        if (pos > local_after) st.local += e;
      }
    }
    float tile_sum = 0.f;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_le0(s[j] - m);
      tile_sum += s[j];
    }
    l += tile_sum;
    if constexpr (kConvertTile) {
      load_values_isa<kAvx2>(a.v_pool, a.kv_dtype, (a.base[it.bh] + t0) * d, n * d, w.tile.data());
      tile_values<F32>(s, w.tile.data(), n, d, acc);
    } else {
      tile_values<S>(s, v_rows + t0 * d, n, d, acc);
    }
  }
  *max_out = m;
  *sum_out = l;
  if (stats) *stats = st;
}

template <class S, bool kAvx2>
HEADKV_INLINE void chunk_dims(const Args& a, const Item& it, Workspace& w, float* acc, float* m, float* l,
                              ItemStats* st) {
  switch (a.head_dim) {  // the common head sizes get loops of a known trip count
    case 64: return chunk_body<S, 64, kAvx2>(a, it, w, acc, m, l, st);
    case 80: return chunk_body<S, 80, kAvx2>(a, it, w, acc, m, l, st);
    case 128: return chunk_body<S, 128, kAvx2>(a, it, w, acc, m, l, st);
    default: return chunk_body<S, 0, kAvx2>(a, it, w, acc, m, l, st);
  }
}

template <bool kAvx2>
HEADKV_INLINE void run_chunk(const Args& a, const Item& it, Workspace& w, float* acc, float* m, float* l,
                             ItemStats* st) {
  switch (a.kv_dtype) {
    case kFloat32: return chunk_dims<Storage<kFloat32>, kAvx2>(a, it, w, acc, m, l, st);
    case kBFloat16: return chunk_dims<Storage<kBFloat16>, kAvx2>(a, it, w, acc, m, l, st);
    default: return chunk_dims<Storage<kFloat16>, kAvx2>(a, it, w, acc, m, l, st);
  }
}

void chunk_baseline(const Args& a, const Item& it, Workspace& w, float* acc, float* m, float* l, ItemStats* st) {
  run_chunk<false>(a, it, w, acc, m, l, st);
}

#ifdef HEADKV_AVX2_CLONE
HEADKV_TARGET_AVX2 void chunk_avx2(const Args& a, const Item& it, Workspace& w, float* acc, float* m, float* l,
                                   ItemStats* st) {
  run_chunk<true>(a, it, w, acc, m, l, st);
}
#endif

using ChunkFn = void (*)(const Args&, const Item&, Workspace&, float*, float*, float*, ItemStats*);

ChunkFn pick_chunk_fn() {
#ifdef HEADKV_AVX2_CLONE
  if (use_avx2()) return chunk_avx2;
#endif
  return chunk_baseline;
}

}  // namespace

void decode_attention(const void* q, const void* q_sink, const void* k_pool, const void* v_pool, const int64_t* base,
                      const int64_t* length, const int64_t* sink_size, const float* fill, void* out, int64_t batch,
                      int64_t heads, int64_t head_dim, int64_t pool_rows, int q_dtype, int kv_dtype, float scale,
                      const int64_t* pos_pool, const int64_t* query_position, int64_t stat_sink, int64_t stat_local,
                      float* stats) {
  check_dtype(q_dtype, "q");
  check_dtype(kv_dtype, "k_pool");
  check_positive(head_dim, "head_dim");
  check_non_negative(batch, "batch");
  check_non_negative(heads, "heads");
  check_non_negative(pool_rows, "pool_rows");
  const int64_t rows = batch * heads;
  if (rows == 0) return;
  check_pointer(q, "q");
  check_pointer(out, "out");
  check_pointer(base, "base");
  check_pointer(length, "length");
  HEADKV_CHECK(q_sink == nullptr || sink_size != nullptr, "sink_size is required with q_sink");
  check_row_ranges(base, length, rows, pool_rows);
  if (stats) {
    check_pointer(pos_pool, "pos_pool");
    check_pointer(query_position, "query_position");
    check_positive(stat_local, "stat_local");
  }

  std::vector<Item> items;
  std::vector<int64_t> first_item(rows + 1, 0);
  for (int64_t bh = 0; bh < rows; ++bh) {
    first_item[bh] = static_cast<int64_t>(items.size());
    for (int64_t start = 0; start < length[bh]; start += kChunk)
      items.push_back({bh, start, std::min(length[bh], start + kChunk)});
  }
  first_item[rows] = static_cast<int64_t>(items.size());
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<float> maxes(n_items), sums(n_items), accs(n_items * head_dim);
  std::vector<ItemStats> item_stats(stats ? n_items : 0);
  const Args a{q,       q_sink,   k_pool, v_pool, base, sink_size, heads, head_dim, q_dtype, kv_dtype, scale,
               stats ? pos_pool : nullptr, query_position, stat_sink, stat_local};
  const ChunkFn run = pick_chunk_fn();
  std::vector<Workspace> workspaces =
      thread_workspaces<Workspace>("decode_attention", std::max(n_items, rows), head_dim, kv_dtype == kFloat16);

#pragma omp parallel num_threads(static_cast<int>(workspaces.size()))
  {
    Workspace& w = workspaces[thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i)
      run(a, items[i], w, accs.data() + i * head_dim, &maxes[i], &sums[i], stats ? &item_stats[i] : nullptr);

    float* merged = w.q.data();  // reused as the output row
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < rows; ++bh) {
      const int64_t begin = first_item[bh], end = first_item[bh + 1];
      if (begin == end) {  // the head keeps nothing: its fill, never 0/0
        const int64_t h = bh % heads;
        for (int64_t c = 0; c < head_dim; ++c) merged[c] = fill ? fill[h * head_dim + c] : 0.f;
        if (stats) std::fill(stats + bh * 3, stats + bh * 3 + 3, 0.f);  // attention over nothing
      } else {
        float global_max = kNegInf;
        for (int64_t i = begin; i < end; ++i) global_max = std::max(global_max, maxes[i]);
        std::fill(merged, merged + head_dim, 0.f);
        float total = 0.f;
        for (int64_t i = begin; i < end; ++i) {
          const float weight = std::exp(maxes[i] - global_max);
          total += weight * sums[i];
          axpy(weight, accs.data() + i * head_dim, merged, head_dim);
        }
        scale_row(1.f / total, merged, head_dim);
        if (stats) {  // entropy = log(total) - sum of e * (s - global_max) / total
          float shifted = 0.f, sink = 0.f, local = 0.f;
          for (int64_t i = begin; i < end; ++i) {
            const float weight = std::exp(maxes[i] - global_max);
            const ItemStats& st = item_stats[i];
            shifted += weight * (st.shifted_sum + (maxes[i] - global_max) * sums[i]);
            sink += weight * st.sink;
            local += weight * st.local;
          }
          stats[bh * 3 + 0] = std::log(total) - shifted / total;
          stats[bh * 3 + 1] = sink / total;
          stats[bh * 3 + 2] = local / total;
        }
      }
      store_row(out, q_dtype, bh, head_dim, merged);
    }
  }
}

}  // namespace headkv
