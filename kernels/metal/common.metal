// Shared by the kernels of this folder: the launcher (headkv_engine/ops/_metal.py) puts it before each op's source.
//
// Every kernel ends with the same three built-in arguments: its threadgroup's position in the grid, the thread's
// lane in its SIMD group and its SIMD group's index in the threadgroup. Scalars travel in two small buffers
// (int64 `ints`, float32 `floats`): buffer bindings are the one argument kind every PyTorch MPS version passes
// the same way. A SIMD group's lanes split a head's dimensions (lane l holds dimensions l, l + 32, ...), so a
// query-key dot product is one simd_sum and every lane sees the same score.
#include <metal_stdlib>
using namespace metal;

#ifndef HEADKV_THREADGROUP
#define HEADKV_THREADGROUP threadgroup
#endif

#define HEADKV_SIMD_WIDTH 32
#define HEADKV_MAX_HEAD_DIM 256
#define HEADKV_DIMS_PER_LANE (HEADKV_MAX_HEAD_DIM / HEADKV_SIMD_WIDTH)

#define HEADKV_BUILTINS                                                                 \
    uint3 group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]], \
        uint simd_index [[simdgroup_index_in_threadgroup]]

// The running maximum starts finite, so no score is ever compared with or subtracted from an infinity (fast math,
// which PYTORCH_MPS_FAST_MATH turns on, may assume none occurs); exp(HEADKV_NO_SCORE - s) is 0 for any real score.
#define HEADKV_NO_SCORE (-FLT_MAX)

// min / max of 64-bit indices (spelled out: the Metal library's integer min / max are not declared for long everywhere)
inline long min_index(long a, long b) { return a < b ? a : b; }
inline long max_index(long a, long b) { return a > b ? a : b; }

// The online softmax of one query over the keys a SIMD group visits, with this lane's share of the output.
struct OnlineSoftmax {
    float m = HEADKV_NO_SCORE;  // running maximum score
    float l = 0.0f;       // sum of exp(score - m)
    float acc[HEADKV_DIMS_PER_LANE] = {};

    // Adds a key of score s; returns the weight exp(s - m) it got and sets `rescale` to the factor that
    // earlier sums were multiplied by (callers keep sums of their own, e.g. the statistics).
    template <typename T>
    float add(float s, device const T* value_row, long head_dim, uint lane, thread float& rescale) {
        const float m_new = max(m, s);
        rescale = exp(m - m_new);  // 0 for the first key
        const float p = exp(s - m_new);
        l = l * rescale + p;
        for (uint i = 0; i < HEADKV_DIMS_PER_LANE; ++i) {
            const long d = lane + long(i) * HEADKV_SIMD_WIDTH;
            const float v = d < head_dim ? float(value_row[d]) : 0.0f;
            acc[i] = acc[i] * rescale + p * v;
        }
        m = m_new;
        return p;
    }
};

// This lane's dimensions of a query row, times `scale`.
template <typename T>
void load_query(device const T* row, long head_dim, float scale, uint lane, thread float* out) {
    for (uint i = 0; i < HEADKV_DIMS_PER_LANE; ++i) {
        const long d = lane + long(i) * HEADKV_SIMD_WIDTH;
        out[i] = d < head_dim ? float(row[d]) * scale : 0.0f;
    }
}

// The score of a key row against a (scaled) query, the same value in every lane.
template <typename T>
float score(thread const float* query, device const T* key_row, long head_dim, uint lane) {
    float part = 0.0f;
    for (uint i = 0; i < HEADKV_DIMS_PER_LANE; ++i) {
        const long d = lane + long(i) * HEADKV_SIMD_WIDTH;
        if (d < head_dim) part += query[i] * float(key_row[d]);
    }
    return simd_sum(part);
}
