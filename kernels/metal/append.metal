// Metal append: scatter a block of new keys / values into the ragged layout, all heads in one launch.
// Semantics: headkv_engine/ops/append.py. Token p of head (b, h) goes to row base[b, h] + slot(p), slot(p) = p for
// p < S, S + (p - S) mod W otherwise, if it is still visible from the block's last position; rows outside the
// pools are never written. One SIMD group per token (threadgroup: APPEND_SIMDS tokens of one (sequence, head)),
// its lanes copying the dimensions.
//
// ints: heads, head_dim, tokens, num_rows.

#define APPEND_SIMDS 4

template <typename TK, typename TPOOL>
void append_body(device const TK* k, device const TK* v, device const long* positions, device const long* base,
                 device const long* sink_size, device const long* window_size, device const long* ints,
                 device TPOOL* k_pool, device TPOOL* v_pool, device long* pos_pool, uint3 group, uint lane,
                 uint simd_index) {
    const long heads = ints[0], head_dim = ints[1], tokens = ints[2], num_rows = ints[3];
    const long t = long(group.x) * APPEND_SIMDS + simd_index, h = group.y, b = group.z;
    if (t >= tokens) return;
    const long bh = b * heads + h;
    const long p = positions[b * tokens + t];
    const long last = positions[b * tokens + tokens - 1];  // positions increase: the last column is the latest
    const long sink = sink_size[h], window = window_size[h];
    const bool keep = p >= 0 && (p < sink || p > last - window);
    const long slot = p < sink ? p : sink + (p - sink) % max_index(window, 1);
    const long row = base[bh] + slot;
    if (!keep || row < 0 || row >= num_rows) return;
    const long src = (bh * tokens + t) * head_dim;
    for (long d = lane; d < head_dim; d += HEADKV_SIMD_WIDTH) {
        k_pool[row * head_dim + d] = TPOOL(float(k[src + d]));
        v_pool[row * head_dim + d] = TPOOL(float(v[src + d]));
    }
    if (lane == 0) pos_pool[row] = p;
}

#define HEADKV_APPEND(TK, TPOOL)                                                                                     \
    kernel void headkv_append_##TK##_##TPOOL(                                                                        \
        device const TK* k [[buffer(0)]], device const TK* v [[buffer(1)]],                                          \
        device const long* positions [[buffer(2)]],                                                                  \
        device const long* base [[buffer(3)]], device const long* sink_size [[buffer(4)]],                           \
        device const long* window_size [[buffer(5)]], device const long* ints [[buffer(6)]],                         \
        device TPOOL* k_pool [[buffer(7)]], device TPOOL* v_pool [[buffer(8)]], device long* pos_pool [[buffer(9)]], \
        HEADKV_BUILTINS) {                                                                                           \
        append_body<TK, TPOOL>(k, v, positions, base, sink_size, window_size, ints, k_pool, v_pool, pos_pool,        \
                               group, lane, simd_index);                                                             \
    }

HEADKV_APPEND(float, float)
HEADKV_APPEND(float, half)
HEADKV_APPEND(half, float)
HEADKV_APPEND(half, half)
#if __METAL_VERSION__ >= 310  // bfloat: Metal 3.1 (macOS 14)
HEADKV_APPEND(float, bfloat)
HEADKV_APPEND(half, bfloat)
HEADKV_APPEND(bfloat, float)
HEADKV_APPEND(bfloat, half)
HEADKV_APPEND(bfloat, bfloat)
#endif
