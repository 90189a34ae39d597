// append on the CPU: write a block of new keys / values into the ragged layout, in place.
// Semantics: headkv_engine/ops/append.py (append_reference): token p of head (b, h) goes to row
// base[b, h] + slot(p), slot(p) = p for p < S and S + (p - S) mod W otherwise, if it is still visible from
// the block's last position (so every slot is written at most once). Padding (p < 0) is never written, and
// neither is anything of a pruned head (S = 0, W = 0).
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

HEADKV_INLINE bool kept(int64_t p, int64_t last, int64_t sink, int64_t window) {
  return p >= 0 && (p < sink || last - p < window);  // (p > last - window, without the overflow of last - window)
}

HEADKV_INLINE int64_t slot_of(int64_t p, int64_t sink, int64_t window) {
  return p < sink ? p : sink + (p - sink) % window;  // window > 0 here: p >= sink and kept means p > last - W
}

// fn(i, p, slot) for every token i of head (b, h) that is kept: its position p and its slot in the head's rows
// (0 <= slot <= p: the row is base[b, h] + slot, added only once the check below has bounded both).
template <class Fn>
HEADKV_INLINE void for_each_kept(int64_t bh, int64_t heads, int64_t tokens, const int64_t* positions,
                                 const int64_t* base, const int64_t* sink_size, const int64_t* window_size,
                                 const std::vector<int64_t>& last, Fn&& fn) {
  const int64_t b = bh / heads, h = bh % heads;
  const int64_t sink = sink_size[h], window = window_size[h];
  for (int64_t i = 0; i < tokens; ++i) {
    const int64_t p = positions[b * tokens + i];
    if (kept(p, last[b], sink, window)) fn(i, p, slot_of(p, sink, window));
  }
}

}  // namespace

void append(void* k_pool, void* v_pool, int64_t* pos_pool, const int64_t* base, const void* k, const void* v,
            const int64_t* positions, const int64_t* sink_size, const int64_t* window_size, int64_t batch,
            int64_t heads, int64_t tokens, int64_t head_dim, int64_t pool_rows, int kv_dtype, int new_dtype) {
  check_dtype(kv_dtype, "k_pool");
  check_dtype(new_dtype, "k");
  check_positive(head_dim, "head_dim");
  check_non_negative(batch, "batch");
  check_non_negative(heads, "heads");
  check_non_negative(tokens, "tokens");
  check_non_negative(pool_rows, "pool_rows");
  if (batch * heads * tokens == 0) return;
  for (const void* p : {static_cast<const void*>(base), k, v, static_cast<const void*>(positions),
                        static_cast<const void*>(sink_size), static_cast<const void*>(window_size)}) {
    check_pointer(p, "every tensor argument");
  }
  std::vector<int64_t> last(batch);
  for (int64_t b = 0; b < batch; ++b) last[b] = *std::max_element(positions + b * tokens, positions + (b + 1) * tokens);
  for (int64_t h = 0; h < heads; ++h) {
    HEADKV_CHECK(sink_size[h] >= 0 && window_size[h] >= 0, "sink_size and window_size must be >= 0, got ",
                 sink_size[h], " and ", window_size[h], " for head ", h);
  }
  // every row written must be inside the pools (checked before anything is written; so the pools' pointers are
  // valid wherever a row is written). base and slot are bounded apart: base + slot of two huge values overflows.
  for (int64_t bh = 0; bh < batch * heads; ++bh) {
    auto check = [&](int64_t, int64_t p, int64_t slot) {
      HEADKV_CHECK(base[bh] >= 0 && base[bh] < pool_rows && slot < pool_rows - base[bh], "append: base ", base[bh],
                   " of sequence ", bh / heads, ", head ", bh % heads, " plus slot ", slot, " (position ", p,
                   ") is outside the pools' ", pool_rows, " rows: base must be >= 0 and base + slot < ", pool_rows,
                   " (reserve capacity >= min(tokens seen, sink + window) per head first)");
    };
    for_each_kept(bh, heads, tokens, positions, base, sink_size, window_size, last, check);
  }
  const int64_t in_bytes = kv_dtype == kFloat32 ? 4 : 2;
  // a row buffer per thread, for converting between dtypes
  std::vector<std::vector<float>> rows =
      thread_workspaces<std::vector<float>>("append", batch * heads, new_dtype == kv_dtype ? int64_t{0} : head_dim);
#pragma omp parallel num_threads(static_cast<int>(rows.size()))
  {
    std::vector<float>& row = rows[thread_num()];
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
      auto write = [&](int64_t i, int64_t p, int64_t slot) {
        const int64_t src = bh * tokens + i, dst = base[bh] + slot;
        if (new_dtype == kv_dtype) {
          const int64_t bytes = head_dim * in_bytes;
          std::memcpy(static_cast<char*>(k_pool) + dst * bytes, static_cast<const char*>(k) + src * bytes, bytes);
          std::memcpy(static_cast<char*>(v_pool) + dst * bytes, static_cast<const char*>(v) + src * bytes, bytes);
        } else {
          load_row(k, new_dtype, src, head_dim, row.data());
          store_row(k_pool, kv_dtype, dst, head_dim, row.data());
          load_row(v, new_dtype, src, head_dim, row.data());
          store_row(v_pool, kv_dtype, dst, head_dim, row.data());
        }
        pos_pool[dst] = p;
      };
      for_each_kept(bh, heads, tokens, positions, base, sink_size, window_size, last, write);
    }
  }
}

}  // namespace headkv
