// decode_attention on the CPU: one query per (sequence, head) over that head's kept rows of the ragged pools.
// Semantics: headkv_engine/ops/decode.py (decode_attention_reference).
//
// Work items are chunks of at most kChunk rows of one head, so a long full head is shared between threads
// while a window head is a single item; each item keeps an online softmax (max, normaliser, weighted sum of
// values) over tiles of kTile rows, and the items of a head are merged by their log-sum-exp.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace headkv {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kTile = 32;

struct Item {
  int64_t bh, start, end;
};

struct Partial {
  float max, sum;
};

}  // namespace

void decode_attention(const void* q, const void* q_sink, const void* k_pool, const void* v_pool, const int64_t* base,
                      const int64_t* length, const int64_t* sink_size, const float* fill, void* out, int64_t batch,
                      int64_t heads, int64_t head_dim, int q_dtype, int kv_dtype, float scale) {
  check_dtype(q_dtype, "q");
  check_dtype(kv_dtype, "k_pool");
  check_positive(head_dim, "head_dim");
  const int64_t rows = batch * heads;
  std::vector<Item> items;
  std::vector<int64_t> first_item(rows + 1, 0);
  for (int64_t bh = 0; bh < rows; ++bh) {
    first_item[bh] = static_cast<int64_t>(items.size());
    for (int64_t start = 0; start < length[bh]; start += kChunk)
      items.push_back({bh, start, std::min(length[bh], start + kChunk)});
  }
  first_item[rows] = static_cast<int64_t>(items.size());
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<Partial> partials(n_items);
  std::vector<float> accs(n_items * head_dim);

#pragma omp parallel
  {
    std::vector<float> qf(head_dim), qsf(head_dim), kt(kTile * head_dim), vt(kTile * head_dim), scores(kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) {
      const Item it = items[i];
      const int64_t h = it.bh % heads;
      load_row(q, q_dtype, it.bh, head_dim, qf.data());
      const int64_t sinks = q_sink ? sink_size[h] : 0;
      if (sinks > 0) load_row(q_sink, q_dtype, it.bh, head_dim, qsf.data());
      float* acc = accs.data() + i * head_dim;
      std::fill(acc, acc + head_dim, 0.f);
      float running_max = kNegInf, running_sum = 0.f;
      for (int64_t t0 = it.start; t0 < it.end; t0 += kTile) {
        const int64_t n = std::min(kTile, it.end - t0);
        const int64_t row0 = base[it.bh] + t0;
        float tile_max = kNegInf;
        for (int64_t j = 0; j < n; ++j) {
          const float* kr;
          if (kv_dtype == kFloat32) {
            kr = static_cast<const float*>(k_pool) + (row0 + j) * head_dim;
          } else {
            load_row(k_pool, kv_dtype, row0 + j, head_dim, kt.data() + j * head_dim);
            kr = kt.data() + j * head_dim;
          }
          const float* qq = (t0 + j < sinks) ? qsf.data() : qf.data();
          scores[j] = dot(qq, kr, head_dim) * scale;
          tile_max = std::max(tile_max, scores[j]);
        }
        const float new_max = std::max(running_max, tile_max);
        if (new_max > running_max) {
          const float correction = std::exp(running_max - new_max);  // exp(-inf) = 0 on the first tile
          running_sum *= correction;
          scale_row(correction, acc, head_dim);
          running_max = new_max;
        }
        for (int64_t j = 0; j < n; ++j) {
          const float p = std::exp(scores[j] - running_max);
          running_sum += p;
          const float* vr;
          if (kv_dtype == kFloat32) {
            vr = static_cast<const float*>(v_pool) + (row0 + j) * head_dim;
          } else {
            load_row(v_pool, kv_dtype, row0 + j, head_dim, vt.data());
            vr = vt.data();
          }
          axpy(p, vr, acc, head_dim);
        }
      }
      partials[i] = {running_max, running_sum};
    }

    std::vector<float> merged(head_dim);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < rows; ++bh) {
      const int64_t begin = first_item[bh], end = first_item[bh + 1];
      if (begin == end) {  // the head keeps nothing: its fill, never 0/0
        const int64_t h = bh % heads;
        for (int64_t d = 0; d < head_dim; ++d) merged[d] = fill ? fill[h * head_dim + d] : 0.f;
      } else {
        float global_max = kNegInf;
        for (int64_t i = begin; i < end; ++i) global_max = std::max(global_max, partials[i].max);
        std::fill(merged.begin(), merged.end(), 0.f);
        float total = 0.f;
        for (int64_t i = begin; i < end; ++i) {
          const float w = std::exp(partials[i].max - global_max);
          total += w * partials[i].sum;
          axpy(w, accs.data() + i * head_dim, merged.data(), head_dim);
        }
        scale_row(1.f / total, merged.data(), head_dim);
      }
      store_row(out, q_dtype, bh, head_dim, merged.data());
    }
  }
}

}  // namespace headkv
