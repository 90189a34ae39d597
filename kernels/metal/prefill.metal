// Metal prefill: causal attention of a block of new queries under each head's sink / window mask.
// Semantics: headkv_engine/ops/prefill.py. One SIMD group serves one query (threadgroup: PREFILL_SIMDS
// consecutive queries of one (sequence, head)). It visits the head's cached rows (at most S + W for a windowed
// head) and, of the block's own keys, only the two ranges the mask can let through: the sink columns and the
// window's columns (block-sparse: a windowed head costs O(S + W) per query, whatever the block length).
// Block positions are -1 (left padding) then consecutive, so a column's position follows from the query's.
//
// ints: heads, head_dim, tokens, has_qsink, has_fill. floats: scale.

#define PREFILL_SIMDS 4

template <typename TQ, typename TKV>
void prefill_body(device const TQ* q, device const TQ* q_sink, device const TQ* k, device const TQ* v,
                  device const long* positions, device const TKV* k_pool, device const TKV* v_pool,
                  device const long* pos_pool, device const long* base, device const long* length,
                  device const long* sink_size, device const long* window_size, device const float* fill,
                  device const long* ints, device const float* floats, device TQ* out, uint3 group, uint lane,
                  uint simd_index) {
    const long heads = ints[0], head_dim = ints[1], tokens = ints[2];
    const bool has_qsink = ints[3] != 0, has_fill = ints[4] != 0;
    const float scale = floats[0];
    const long t = long(group.x) * PREFILL_SIMDS + simd_index, h = group.y, b = group.z;
    if (t >= tokens) return;  // the whole SIMD group: no barrier follows
    const long bh = b * heads + h;
    const long row_offset = (bh * tokens + t) * head_dim;
    device const long* block_pos = positions + b * tokens;
    const long query_pos = block_pos[t];
    const long sink = sink_size[h], window = window_size[h];

    float query[HEADKV_DIMS_PER_LANE], query_sink[HEADKV_DIMS_PER_LANE];
    load_query(q + row_offset, head_dim, scale, lane, query);
    if (has_qsink) load_query(q_sink + row_offset, head_dim, scale, lane, query_sink);

    OnlineSoftmax state;
    float rescale;
    if (query_pos >= 0) {  // padding queries see nothing: they output the fill
        // the head's cached rows, each checked against the mask
        const long start = base[bh], rows = length[bh];
        for (long j = 0; j < rows; ++j) {
            const long row = start + j, key_pos = pos_pool[row];
            const bool seen = key_pos >= 0 && key_pos <= query_pos && (key_pos < sink || key_pos > query_pos - window);
            if (!seen) continue;  // the same in every lane
            const bool sink_key = has_qsink && key_pos < sink;
            const float s = score(sink_key ? query_sink : query, k_pool + row * head_dim, head_dim, lane);
            state.add(s, v_pool + row * head_dim, head_dim, lane, rescale);
        }
        // the block's own keys: the first real column (binary search over the padding), then the sink
        // columns (positions < S) and the window's columns (positions > query_pos - W), up to the query
        long first = 0, last = t;
        while (first < last) {
            const long mid = (first + last) / 2;
            if (block_pos[mid] >= 0) last = mid; else first = mid + 1;
        }
        const long column_of_zero = t - query_pos;  // the column position 0 would have
        // sink columns: first .. sink_end - 1; window columns: window_start .. t
        const long sink_end = min_index(t + 1, max_index(first, column_of_zero + sink));
        const long window_start = max_index(sink_end, max_index(first, t - window + 1));
        for (long c = first; c <= t; ++c) {
            if (c == sink_end) c = window_start;
            if (c > t) break;
            const long token = (bh * tokens + c) * head_dim;
            const bool sink_key = has_qsink && (query_pos - (t - c)) < sink;
            const float s = score(sink_key ? query_sink : query, k + token, head_dim, lane);
            state.add(s, v + token, head_dim, lane, rescale);
        }
    }
    device TQ* out_row = out + row_offset;
    for (uint i = 0; i < HEADKV_DIMS_PER_LANE; ++i) {
        const long d = lane + long(i) * HEADKV_SIMD_WIDTH;
        if (d >= head_dim) break;
        if (state.l != 0.0f) out_row[d] = TQ(state.acc[i] / state.l);  // NaN stays NaN
        else out_row[d] = has_fill ? TQ(fill[h * head_dim + d]) : TQ(0.0f);  // no visible key (guard 0/0)
    }
}

#define HEADKV_PREFILL(TQ, TKV)                                                                                      \
    kernel void headkv_prefill_##TQ##_##TKV(                                                                         \
        device const TQ* q [[buffer(0)]], device const TQ* q_sink [[buffer(1)]], device const TQ* k [[buffer(2)]],   \
        device const TQ* v [[buffer(3)]], device const long* positions [[buffer(4)]],                                \
        device const TKV* k_pool [[buffer(5)]], device const TKV* v_pool [[buffer(6)]],                              \
        device const long* pos_pool [[buffer(7)]], device const long* base [[buffer(8)]],                            \
        device const long* length [[buffer(9)]], device const long* sink_size [[buffer(10)]],                        \
        device const long* window_size [[buffer(11)]], device const float* fill [[buffer(12)]],                      \
        device const long* ints [[buffer(13)]], device const float* floats [[buffer(14)]],                           \
        device TQ* out [[buffer(15)]], HEADKV_BUILTINS) {                                                            \
        prefill_body<TQ, TKV>(q, q_sink, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size,         \
                              window_size, fill, ints, floats, out, group, lane, simd_index);                        \
    }

HEADKV_PREFILL(float, float)
HEADKV_PREFILL(float, half)
HEADKV_PREFILL(half, float)
HEADKV_PREFILL(half, half)
#if __METAL_VERSION__ >= 310  // bfloat: Metal 3.1 (macOS 14)
HEADKV_PREFILL(float, bfloat)
HEADKV_PREFILL(half, bfloat)
HEADKV_PREFILL(bfloat, float)
HEADKV_PREFILL(bfloat, half)
HEADKV_PREFILL(bfloat, bfloat)
#endif
