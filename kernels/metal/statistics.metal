// Metal head statistics: per-query attention statistics of a block of queries, two passes over the causal keys.
// Semantics and field layout: headkv_engine/ops/statistics.py. One SIMD group serves one query (threadgroup:
// STATISTICS_SIMDS consecutive queries of one head): pass 1 finds the query's max score and normaliser, pass 2
// turns each score into its probability and lane 0 adds it to the query's fields in threadgroup memory. Each query
// writes its own fp32 row [fields] (zeros for a query before min_query); the launcher adds the rows in fp64 (MPS has
// no fp64), so no score matrix exists and the sums do not depend on scheduling.
//
// ints: heads, head_dim, tokens_q, tokens_k, q_start, sink_size, local_window, min_query, log2 bins, fields.
// floats: scale.

#define STATISTICS_SIMDS 4
#define STATISTICS_MAX_FIELDS 112  // 78 + log2 bins; the bins of 2^31 keys are 32
#define STATISTICS_REGIONS_AT 5
#define STATISTICS_RELATIVE_AT 9
#define STATISTICS_RELATIVE_BINS 64
#define STATISTICS_SINKS_AT 73
#define STATISTICS_LOG2_AT 78

template <typename T>
void statistics_body(device const T* q, device const T* k, device const long* recent_start, device const long* ints,
                     device const float* floats, device float* rows, threadgroup float* fields_of_simd, uint3 group,
                     uint lane, uint simd_index) {
    const long heads = ints[0], head_dim = ints[1], tokens_q = ints[2], tokens_k = ints[3], q_start = ints[4];
    const long sink_size = ints[5], local_window = ints[6], min_query = ints[7], bins = ints[8], fields = ints[9];
    const float scale = floats[0];
    const long i = long(group.x) * STATISTICS_SIMDS + simd_index, h = group.y;
    if (i >= tokens_q || h >= heads) return;  // the whole SIMD group: no barrier follows
    device float* out = rows + (h * tokens_q + i) * fields;
    const long query_pos = q_start + i;
    if (query_pos < min_query) {  // not analysed: a row of zeros (count 0)
        for (long f = lane; f < fields; f += HEADKV_SIMD_WIDTH) out[f] = 0.0f;
        return;
    }
    float query[HEADKV_DIMS_PER_LANE];
    load_query(q + (h * tokens_q + i) * head_dim, head_dim, scale, lane, query);
    device const T* keys = k + h * tokens_k * head_dim;

    // pass 1: max score and normaliser over the keys 0 .. query_pos
    float m = HEADKV_NO_SCORE, l = 0.0f;
    for (long j = 0; j <= query_pos; ++j) {
        const float s = score(query, keys + j * head_dim, head_dim, lane);
        const float m_new = max(m, s);
        l = l * exp(m - m_new) + exp(s - m_new);
        m = m_new;
    }
    const float log_l = log(l);

    // pass 2: each key's probability into the fields (lane 0 holds the sums; every lane computed the score)
    threadgroup float* acc = fields_of_simd + simd_index * STATISTICS_MAX_FIELDS;
    if (lane == 0)
        for (long f = 0; f < fields; ++f) acc[f] = 0.0f;
    const long recent_from = recent_start[i];
    float entropy = 0.0f, max_prob = 0.0f;
    for (long j = 0; j <= query_pos; ++j) {
        const float s = score(query, keys + j * head_dim, head_dim, lane);
        if (lane != 0) continue;
        const float log_p = s - m - log_l;
        const float p = exp(log_p);
        entropy -= p * log_p;
        max_prob = max(max_prob, p);
        const long distance = query_pos - j;
        // regions, first match wins: sink, local, recent, global
        const int region = j < sink_size ? 0 : distance < local_window ? 1 : j >= recent_from ? 2 : 3;
        acc[STATISTICS_REGIONS_AT + region] += p;
        acc[STATISTICS_RELATIVE_AT + min_index(distance, STATISTICS_RELATIVE_BINS - 1)] += p;
        for (int s_index = 0, first = 1; s_index < 5; ++s_index, first *= 2)  // sink sizes 1, 2, 4, 8, 16
            if (j < first) acc[STATISTICS_SINKS_AT + s_index] += p;
        // log2 bins: 0 for distance 0, floor(log2(distance)) + 1 above (distances < 2^32)
        const long log2_bin = distance == 0 ? 0 : long(32 - clz(uint(distance)));
        acc[STATISTICS_LOG2_AT + min_index(log2_bin, bins - 1)] += p;
    }
    if (lane == 0) {
        out[0] = 1.0f;
        out[1] = entropy;
        out[2] = entropy * entropy;
        out[3] = max_prob;
        out[4] = log(float(query_pos + 1)) - entropy;
        for (long f = STATISTICS_REGIONS_AT; f < fields; ++f) out[f] = acc[f];
    }
}

#define HEADKV_STATISTICS(T)                                                                                         \
    kernel void headkv_statistics_##T##_##T(                                                                         \
        device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],                                            \
        device const long* recent_start [[buffer(2)]], device const long* ints [[buffer(3)]],                        \
        device const float* floats [[buffer(4)]], device float* rows [[buffer(5)]], HEADKV_BUILTINS) {               \
        HEADKV_THREADGROUP float fields_of_simd[STATISTICS_SIMDS * STATISTICS_MAX_FIELDS];                           \
        statistics_body<T>(q, k, recent_start, ints, floats, rows, fields_of_simd, group, lane, simd_index);         \
    }

HEADKV_STATISTICS(float)
HEADKV_STATISTICS(half)
#if __METAL_VERSION__ >= 310  // bfloat: Metal 3.1 (macOS 14)
HEADKV_STATISTICS(bfloat)
#endif
