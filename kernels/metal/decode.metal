// Metal decode: one new query per (sequence, head) over that head's kept rows of the ragged pools.
// Semantics: headkv_engine/ops/decode.py. A threadgroup serves one (sequence, head); its DECODE_SIMDS SIMD groups
// take every DECODE_SIMDS-th row, each with an online softmax, and merge through threadgroup memory at the end
// (a split over keys, as flash-decoding splits them over programs). A head with no kept row writes its fill.
//
// ints: heads, head_dim, has_qsink, has_fill, with_stats, stat_sink, stat_local. floats: scale.
// With stats, `stats` [B, H, 3] gets the step's entropy, sink mass (positions < stat_sink) and local mass
// (positions > query_position - stat_local); the entropy accumulates online: log Z - sum(p * s).

#define DECODE_SIMDS 4
#define DECODE_STATE 5  // per SIMD group: m, l, sum of exp(s - m) * s, sink sum, local sum

template <typename TQ, typename TKV>
void decode_body(device const TQ* q, device const TQ* q_sink, device const TKV* k_pool, device const TKV* v_pool,
                 device const long* base, device const long* length, device const long* sink_size,
                 device const float* fill, device const long* pos_pool, device const long* query_position,
                 device const long* ints, device const float* floats, device TQ* out, device float* stats,
                 threadgroup float* part_state, threadgroup float* part_acc, uint3 group, uint lane,
                 uint simd_index) {
    const long heads = ints[0], head_dim = ints[1];
    const bool has_qsink = ints[2] != 0, has_fill = ints[3] != 0, with_stats = ints[4] != 0;
    const long stat_sink = ints[5], stat_local = ints[6];
    const float scale = floats[0];
    const long bh = group.x, b = bh / heads, h = bh % heads;
    const long start = base[bh], rows = length[bh];

    float query[HEADKV_DIMS_PER_LANE], query_sink[HEADKV_DIMS_PER_LANE];
    load_query(q + bh * head_dim, head_dim, scale, lane, query);
    const long sink_rows = has_qsink ? sink_size[h] : 0;  // shifted mode: slots < S are scored with q_sink
    if (has_qsink) load_query(q_sink + bh * head_dim, head_dim, scale, lane, query_sink);
    const long query_pos = with_stats ? query_position[b] : 0;

    OnlineSoftmax state;
    float weighted_score = 0.0f, sink_sum = 0.0f, local_sum = 0.0f;
    for (long j = simd_index; j < rows; j += DECODE_SIMDS) {
        const long row = start + j;
        const float s = score(j < sink_rows ? query_sink : query, k_pool + row * head_dim, head_dim, lane);
        float rescale;
        const float p = state.add(s, v_pool + row * head_dim, head_dim, lane, rescale);
        if (with_stats) {
            const long key_pos = pos_pool[row];
            weighted_score = weighted_score * rescale + p * s;
            sink_sum = sink_sum * rescale + (key_pos < stat_sink ? p : 0.0f);
            local_sum = local_sum * rescale + (key_pos > query_pos - stat_local ? p : 0.0f);
        }
    }

    // merge the SIMD groups' partial softmaxes
    if (lane == 0) {
        threadgroup float* mine = part_state + simd_index * DECODE_STATE;
        mine[0] = state.m;
        mine[1] = state.l;
        mine[2] = weighted_score;
        mine[3] = sink_sum;
        mine[4] = local_sum;
    }
    for (uint i = 0; i < HEADKV_DIMS_PER_LANE; ++i) {
        const long d = lane + long(i) * HEADKV_SIMD_WIDTH;
        if (d < head_dim) part_acc[simd_index * HEADKV_MAX_HEAD_DIM + d] = state.acc[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    const uint thread_id = simd_index * HEADKV_SIMD_WIDTH + lane;
    device TQ* out_row = out + bh * head_dim;
    if (rows == 0) {  // pruned or empty head: its fill (guard 0/0)
        for (long d = thread_id; d < head_dim; d += DECODE_SIMDS * HEADKV_SIMD_WIDTH)
            out_row[d] = has_fill ? TQ(fill[h * head_dim + d]) : TQ(0.0f);
        if (with_stats && thread_id == 0)
            for (int f = 0; f < 3; ++f) stats[bh * 3 + f] = 0.0f;
        return;
    }
    float m = HEADKV_NO_SCORE;
    for (uint s = 0; s < DECODE_SIMDS; ++s) m = max(m, part_state[s * DECODE_STATE]);
    float weight[DECODE_SIMDS];
    float total = 0.0f;
    for (uint s = 0; s < DECODE_SIMDS; ++s) {
        // a SIMD group that saw no row has l = 0: weight 0
        weight[s] = part_state[s * DECODE_STATE + 1] > 0.0f ? exp(part_state[s * DECODE_STATE] - m) : 0.0f;
        total += part_state[s * DECODE_STATE + 1] * weight[s];
    }
    for (long d = thread_id; d < head_dim; d += DECODE_SIMDS * HEADKV_SIMD_WIDTH) {
        float o = 0.0f;
        for (uint s = 0; s < DECODE_SIMDS; ++s) o += part_acc[s * HEADKV_MAX_HEAD_DIM + d] * weight[s];
        out_row[d] = TQ(o / total);
    }
    if (with_stats && thread_id == 0) {
        float ws = 0.0f, sink = 0.0f, local = 0.0f;
        for (uint s = 0; s < DECODE_SIMDS; ++s) {
            ws += part_state[s * DECODE_STATE + 2] * weight[s];
            sink += part_state[s * DECODE_STATE + 3] * weight[s];
            local += part_state[s * DECODE_STATE + 4] * weight[s];
        }
        stats[bh * 3 + 0] = m + log(total) - ws / total;  // -sum p log p with p = exp(s - m) / total
        stats[bh * 3 + 1] = sink / total;
        stats[bh * 3 + 2] = local / total;
    }
}

#define HEADKV_DECODE(TQ, TKV)                                                                                       \
    kernel void headkv_decode_##TQ##_##TKV(                                                                          \
        device const TQ* q [[buffer(0)]], device const TQ* q_sink [[buffer(1)]],                                     \
        device const TKV* k_pool [[buffer(2)]], device const TKV* v_pool [[buffer(3)]],                              \
        device const long* base [[buffer(4)]], device const long* length [[buffer(5)]],                              \
        device const long* sink_size [[buffer(6)]], device const float* fill [[buffer(7)]],                          \
        device const long* pos_pool [[buffer(8)]], device const long* query_position [[buffer(9)]],                  \
        device const long* ints [[buffer(10)]], device const float* floats [[buffer(11)]],                           \
        device TQ* out [[buffer(12)]], device float* stats [[buffer(13)]], HEADKV_BUILTINS) {                        \
        HEADKV_THREADGROUP float part_state[DECODE_SIMDS * DECODE_STATE];                                            \
        HEADKV_THREADGROUP float part_acc[DECODE_SIMDS * HEADKV_MAX_HEAD_DIM];                                       \
        decode_body<TQ, TKV>(q, q_sink, k_pool, v_pool, base, length, sink_size, fill, pos_pool, query_position,     \
                             ints, floats, out, stats, part_state, part_acc, group, lane, simd_index);               \
    }

HEADKV_DECODE(float, float)
HEADKV_DECODE(float, half)
HEADKV_DECODE(half, float)
HEADKV_DECODE(half, half)
#if __METAL_VERSION__ >= 310  // bfloat: Metal 3.1 (macOS 14)
HEADKV_DECODE(float, bfloat)
HEADKV_DECODE(half, bfloat)
HEADKV_DECODE(bfloat, float)
HEADKV_DECODE(bfloat, half)
HEADKV_DECODE(bfloat, bfloat)
#endif
