// Dispatch of an emulated Metal kernel: every kernel in kernels/metal ends with the same three built-in
// arguments (threadgroup_position_in_grid, thread_index_in_simdgroup, simdgroup_index_in_threadgroup);
// the others are buffers, passed here as an array of data pointers in the kernel's argument order.
#pragma once

namespace headkv_emu {

template <typename... P, size_t... I>
void invoke(void (*fn)(P...), void* const* buffers, uint3 group, uint lane, uint simd, std::index_sequence<I...>) {
    using Params = std::tuple<P...>;
    fn(static_cast<std::tuple_element_t<I, Params>>(buffers[I])..., group, lane, simd);
}

// One for every kernel of the library (a template's static would be one per kernel signature).
inline std::mutex& one_launch_at_a_time() {
    static std::mutex mutex;
    return mutex;
}

template <typename... P>
constexpr unsigned buffer_count(void (*)(P...)) {
    return sizeof...(P) - 3;
}

// dims: threadgroups along x, y, z, then threads per threadgroup. One worker per thread of a threadgroup runs the
// threadgroups in turn; a launch-wide barrier between them keeps the (static) threadgroup memory to one group, and
// one launch of this compiled library runs at a time (ctypes lets other Python threads launch meanwhile).
template <typename... P>
void launch(void (*fn)(P...), void* const* buffers, const unsigned* dims) {
    static_assert(sizeof...(P) >= 3, "a kernel ends with its three built-in arguments");
    constexpr size_t buffer_count = sizeof...(P) - 3;
    const uint threads = dims[3];
    const size_t groups = size_t(dims[0]) * dims[1] * dims[2];
    if (groups == 0 || threads == 0) return;
    std::lock_guard<std::mutex> hold(one_launch_at_a_time());
    std::vector<std::unique_ptr<Group>> states;
    states.reserve(groups);
    for (size_t g = 0; g < groups; ++g) states.emplace_back(new Group(threads, g % 2 == 1));
    std::barrier<> between_groups(threads);
    std::vector<Thread> workers;
    workers.reserve(threads);
    for (uint t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            for (size_t g = 0; g < groups; ++g) {
                const uint3 position{uint(g % dims[0]), uint(g / dims[0] % dims[1]), uint(g / dims[0] / dims[1])};
                current = Lane{states[g].get(), t / SIMD_WIDTH, t % SIMD_WIDTH};
                states[g]->start(t / SIMD_WIDTH);
                invoke(fn, buffers, position, t % SIMD_WIDTH, t / SIMD_WIDTH,
                       std::make_index_sequence<buffer_count>{});
                states[g]->leave(t);
                between_groups.arrive_and_wait();
            }
        });
    }
    for (auto& worker : workers) worker.join();
}

}  // namespace headkv_emu
