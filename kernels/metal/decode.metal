// Metal decode: one new query per (sequence, head) over that head's kept rows of the ragged pools.
// Semantics: headkv_engine/ops/decode.py. Work items are (sequence-head, chunk of DECODE rows): a threadgroup's
// DECODE_SIMDS SIMD groups take every DECODE_SIMDS-th row of its chunk, each with an online softmax, and merge
// through threadgroup memory. When every head fits one chunk, that is the result; when some head spans more chunks
// (a long full head, split so that it spreads over the GPU and no threadgroup waits on it alone), each chunk of
// every head writes its partial softmax and headkv_decode_merge_* combines them (flash-decoding's split-K).
// A head with no kept row writes its fill (guard 0/0).
//
// ints: heads, head_dim, has_qsink, has_fill, with_stats, stat_sink, stat_local, chunk_rows, split (0: one chunk
// per head, results written directly; 1: partials, then the merge), num_chunks, max_rows (rows past it are not
// read: the host's bound of the lengths). floats: scale.
// With stats, `stats` [B, H, 3] gets the step's entropy, sink mass (positions < stat_sink) and local mass
// (positions > query_position - stat_local); the entropy accumulates online: log Z - sum(p * s).

#define DECODE_SIMDS 4
#define DECODE_STATE 5  // per partial softmax: m, l, sum of exp(s - m) * s, sink sum, local sum

// Writes a head's result from its merged softmax: out = acc / l, and the statistics.
template <typename TQ>
void write_result(device TQ* out_row, long d, float acc, float l) {
    out_row[d] = TQ(acc / l);
}

inline void write_statistics(device float* stats_row, thread const float* state) {
    const float m = state[0], l = state[1];
    stats_row[0] = m + log(l) - state[2] / l;  // -sum p log p with p = exp(s - m) / l
    stats_row[1] = state[3] / l;
    stats_row[2] = state[4] / l;
}

// A head with no kept row: its fill (zeros without one), and zero statistics.
template <typename TQ>
void write_empty(device TQ* out_row, device const float* fill_row, bool has_fill, device float* stats_row,
                 bool with_stats, long head_dim, uint thread_id) {
    for (long d = thread_id; d < head_dim; d += DECODE_SIMDS * HEADKV_SIMD_WIDTH)
        out_row[d] = has_fill ? TQ(fill_row[d]) : TQ(0.0f);
    if (with_stats && thread_id == 0)
        for (int f = 0; f < 3; ++f) stats_row[f] = 0.0f;
}

template <typename TQ, typename TKV>
void decode_body(device const TQ* q, device const TQ* q_sink, device const TKV* k_pool, device const TKV* v_pool,
                 device const long* base, device const long* length, device const long* sink_size,
                 device const float* fill, device const long* pos_pool, device const long* query_position,
                 device const long* ints, device const float* floats, device TQ* out, device float* stats,
                 device float* chunk_state, device float* chunk_acc, threadgroup float* part_state,
                 threadgroup float* part_acc, uint3 group, uint lane, uint simd_index) {
    const long heads = ints[0], head_dim = ints[1];
    const bool has_qsink = ints[2] != 0, has_fill = ints[3] != 0, with_stats = ints[4] != 0;
    const long stat_sink = ints[5], stat_local = ints[6], chunk_rows = ints[7], num_chunks = ints[9];
    const bool split = ints[8] != 0;
    const float scale = floats[0];
    const long bh = group.x, b = bh / heads, h = bh % heads, chunk = group.y;
    const long start = base[bh], rows = min_index(length[bh], ints[10]);
    const long first_row = chunk * chunk_rows, end_row = min_index(rows, first_row + chunk_rows);
    if (split && first_row >= rows) return;  // past this head's rows (the whole threadgroup, before any barrier)

    float query[HEADKV_DIMS_PER_LANE], query_sink[HEADKV_DIMS_PER_LANE];
    load_query(q + bh * head_dim, head_dim, scale, lane, query);
    const long sink_rows = has_qsink ? sink_size[h] : 0;  // shifted mode: slots < S are scored with q_sink
    if (has_qsink) load_query(q_sink + bh * head_dim, head_dim, scale, lane, query_sink);
    const long query_pos = with_stats ? query_position[b] : 0;

    OnlineSoftmax state;
    float weighted_score = 0.0f, sink_sum = 0.0f, local_sum = 0.0f;
    for (long j = first_row + simd_index; j < end_row; j += DECODE_SIMDS) {
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
    if (rows == 0) {
        write_empty(out_row, fill + h * head_dim, has_fill, stats + bh * 3, with_stats, head_dim, thread_id);
        return;
    }
    float merged[DECODE_STATE] = {HEADKV_NO_SCORE, 0.0f, 0.0f, 0.0f, 0.0f};
    for (uint s = 0; s < DECODE_SIMDS; ++s) merged[0] = max(merged[0], part_state[s * DECODE_STATE]);
    float weight[DECODE_SIMDS];
    for (uint s = 0; s < DECODE_SIMDS; ++s) {
        // a SIMD group that saw no row has l = 0: weight 0
        threadgroup const float* theirs = part_state + s * DECODE_STATE;
        weight[s] = theirs[1] > 0.0f ? exp(theirs[0] - merged[0]) : 0.0f;
        for (int f = 1; f < DECODE_STATE; ++f) merged[f] += theirs[f] * weight[s];
    }
    const long item = bh * num_chunks + chunk;  // this chunk's partial, when the head is split
    for (long d = thread_id; d < head_dim; d += DECODE_SIMDS * HEADKV_SIMD_WIDTH) {
        float o = 0.0f;
        for (uint s = 0; s < DECODE_SIMDS; ++s) o += part_acc[s * HEADKV_MAX_HEAD_DIM + d] * weight[s];
        if (split) chunk_acc[item * head_dim + d] = o;
        else write_result(out_row, d, o, merged[1]);
    }
    if (thread_id == 0) {
        if (split)
            for (int f = 0; f < DECODE_STATE; ++f) chunk_state[item * DECODE_STATE + f] = merged[f];
        else if (with_stats)
            write_statistics(stats + bh * 3, merged);
    }
}

// Combines the chunks of each head (one threadgroup per sequence-head).
template <typename TQ>
void decode_merge_body(device const long* length, device const float* fill, device const float* chunk_state,
                       device const float* chunk_acc, device const long* ints, device TQ* out, device float* stats,
                       uint3 group, uint lane, uint simd_index) {
    const long heads = ints[0], head_dim = ints[1], chunk_rows = ints[7], num_chunks = ints[9];
    const bool has_fill = ints[3] != 0, with_stats = ints[4] != 0;
    const long bh = group.x, h = bh % heads, rows = min_index(length[bh], ints[10]);
    const uint thread_id = simd_index * HEADKV_SIMD_WIDTH + lane;
    device TQ* out_row = out + bh * head_dim;
    if (rows == 0) {
        write_empty(out_row, fill + h * head_dim, has_fill, stats + bh * 3, with_stats, head_dim, thread_id);
        return;
    }
    const long chunks = min_index(num_chunks, (rows + chunk_rows - 1) / chunk_rows);  // the chunks that hold rows
    device const float* states = chunk_state + bh * num_chunks * DECODE_STATE;
    float merged[DECODE_STATE] = {HEADKV_NO_SCORE, 0.0f, 0.0f, 0.0f, 0.0f};
    for (long c = 0; c < chunks; ++c) merged[0] = max(merged[0], states[c * DECODE_STATE]);
    for (long c = 0; c < chunks; ++c) {
        const float weight = exp(states[c * DECODE_STATE] - merged[0]);  // every chunk here saw rows: l > 0
        for (int f = 1; f < DECODE_STATE; ++f) merged[f] += states[c * DECODE_STATE + f] * weight;
    }
    for (long d = thread_id; d < head_dim; d += DECODE_SIMDS * HEADKV_SIMD_WIDTH) {
        float o = 0.0f;
        for (long c = 0; c < chunks; ++c)
            o += chunk_acc[(bh * num_chunks + c) * head_dim + d] * exp(states[c * DECODE_STATE] - merged[0]);
        write_result(out_row, d, o, merged[1]);
    }
    if (with_stats && thread_id == 0) write_statistics(stats + bh * 3, merged);
}

#define HEADKV_DECODE(TQ, TKV)                                                                                       \
    kernel void headkv_decode_##TQ##_##TKV(                                                                          \
        device const TQ* q [[buffer(0)]], device const TQ* q_sink [[buffer(1)]],                                     \
        device const TKV* k_pool [[buffer(2)]], device const TKV* v_pool [[buffer(3)]],                              \
        device const long* base [[buffer(4)]], device const long* length [[buffer(5)]],                              \
        device const long* sink_size [[buffer(6)]], device const float* fill [[buffer(7)]],                          \
        device const long* pos_pool [[buffer(8)]], device const long* query_position [[buffer(9)]],                  \
        device const long* ints [[buffer(10)]], device const float* floats [[buffer(11)]],                           \
        device TQ* out [[buffer(12)]], device float* stats [[buffer(13)]], device float* chunk_state [[buffer(14)]], \
        device float* chunk_acc [[buffer(15)]], HEADKV_BUILTINS) {                                                   \
        HEADKV_THREADGROUP float part_state[DECODE_SIMDS * DECODE_STATE];                                            \
        HEADKV_THREADGROUP float part_acc[DECODE_SIMDS * HEADKV_MAX_HEAD_DIM];                                       \
        decode_body<TQ, TKV>(q, q_sink, k_pool, v_pool, base, length, sink_size, fill, pos_pool, query_position,     \
                             ints, floats, out, stats, chunk_state, chunk_acc, part_state, part_acc, group, lane,    \
                             simd_index);                                                                            \
    }

#define HEADKV_DECODE_MERGE(TQ)                                                                                      \
    kernel void headkv_decode_merge_##TQ##_##TQ(                                                                     \
        device const long* length [[buffer(0)]], device const float* fill [[buffer(1)]],                             \
        device const float* chunk_state [[buffer(2)]], device const float* chunk_acc [[buffer(3)]],                  \
        device const long* ints [[buffer(4)]], device TQ* out [[buffer(5)]], device float* stats [[buffer(6)]],      \
        HEADKV_BUILTINS) {                                                                                           \
        decode_merge_body<TQ>(length, fill, chunk_state, chunk_acc, ints, out, stats, group, lane, simd_index);      \
    }

HEADKV_DECODE(float, float)
HEADKV_DECODE(float, half)
HEADKV_DECODE(half, float)
HEADKV_DECODE(half, half)
HEADKV_DECODE_MERGE(float)
HEADKV_DECODE_MERGE(half)
#if __METAL_VERSION__ >= 310  // bfloat: Metal 3.1 (macOS 14)
HEADKV_DECODE(float, bfloat)
HEADKV_DECODE(half, bfloat)
HEADKV_DECODE(bfloat, float)
HEADKV_DECODE(bfloat, half)
HEADKV_DECODE(bfloat, bfloat)
HEADKV_DECODE_MERGE(bfloat)
#endif
