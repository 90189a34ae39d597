// The CPU kernels' entry points (pointers and sizes; Python checks shapes, dtypes and contiguity first; the
// kernels check dtype codes, sizes and that every row they touch lies inside the pools' pool_rows rows).
#pragma once

#include <cstdint>

namespace headkv {

void decode_attention(const void* q, const void* q_sink, const void* k_pool, const void* v_pool, const int64_t* base,
                      const int64_t* length, const int64_t* sink_size, const float* fill, void* out, int64_t batch,
                      int64_t heads, int64_t head_dim, int64_t pool_rows, int q_dtype, int kv_dtype, float scale,
                      const int64_t* pos_pool, const int64_t* query_position, int64_t stat_sink, int64_t stat_local,
                      float* stats);

void prefill_attention(const void* q, const void* q_sink, const void* k, const void* v, const int64_t* positions,
                       const void* k_pool, const void* v_pool, const int64_t* pos_pool, const int64_t* base,
                       const int64_t* length, const int64_t* sink_size, const int64_t* window_size, const float* fill,
                       void* out, int64_t batch, int64_t heads, int64_t tokens, int64_t head_dim, int64_t pool_rows,
                       int q_dtype, int kv_dtype, float scale);

void append(void* k_pool, void* v_pool, int64_t* pos_pool, const int64_t* base, const void* k, const void* v,
            const int64_t* positions, const int64_t* sink_size, const int64_t* window_size, int64_t batch,
            int64_t heads, int64_t tokens, int64_t head_dim, int64_t pool_rows, int kv_dtype, int new_dtype);

int64_t head_statistics_fields(int64_t log2_bins);

void head_statistics(const void* q, const void* k, int64_t heads, int64_t tokens_q, int64_t tokens_k,
                     int64_t head_dim, int dtype, int64_t q_start, float scale, int64_t sink_size,
                     int64_t local_window, double recent_ratio, int64_t min_query, int64_t log2_bins, double* sums);

}  // namespace headkv
