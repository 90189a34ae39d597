// append on the CPU: write a block of new keys / values into the ragged layout, in place.
// Semantics: headkv_engine/ops/append.py (append_reference): token p of head (b, h) goes to row
// base[b, h] + slot(p), slot(p) = p for p < S and S + (p - S) mod W otherwise, if it is still visible from
// the block's last position (so every slot is written at most once).
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {

void append(void* k_pool, void* v_pool, int64_t* pos_pool, const int64_t* base, const void* k, const void* v,
            const int64_t* positions, const int64_t* sink_size, const int64_t* window_size, int64_t batch,
            int64_t heads, int64_t tokens, int64_t head_dim, int kv_dtype, int new_dtype) {
  check_dtype(kv_dtype, "k_pool");
  check_dtype(new_dtype, "k");
  check_positive(head_dim, "head_dim");
  if (tokens <= 0) return;
#pragma omp parallel
  {
    std::vector<float> row(head_dim);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const int64_t sink = sink_size[h], window = window_size[h];
      const int64_t* pos = positions + b * tokens;
      const int64_t last = *std::max_element(pos, pos + tokens);
      for (int64_t i = 0; i < tokens; ++i) {
        const int64_t p = pos[i];
        if (p < 0 || !(p < sink || p > last - window)) continue;
        const int64_t slot = p < sink ? p : sink + (p - sink) % window;
        const int64_t dst = base[bh] + slot, src = bh * tokens + i;
        if (new_dtype == kv_dtype) {
          const int64_t bytes = head_dim * (kv_dtype == kFloat32 ? 4 : 2);
          std::memcpy(static_cast<char*>(k_pool) + dst * bytes, static_cast<const char*>(k) + src * bytes, bytes);
          std::memcpy(static_cast<char*>(v_pool) + dst * bytes, static_cast<const char*>(v) + src * bytes, bytes);
        } else {
          load_row(k, new_dtype, src, head_dim, row.data());
          store_row(k_pool, kv_dtype, dst, head_dim, row.data());
          load_row(v, new_dtype, src, head_dim, row.data());
          store_row(v_pool, kv_dtype, dst, head_dim, row.data());
        }
        pos_pool[dst] = p;
      }
    }
  }
}

}  // namespace headkv
