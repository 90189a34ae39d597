// Python bindings of the CPU kernels: pointers (as integers), sizes and dtype codes in; the GIL is released
// while a kernel runs. headkv_engine/ops/_cpu.py is the only caller (headkv_engine/_C.pyi lists the exports).
// Kernel argument errors are std::invalid_argument, which pybind11 raises as ValueError.
#include <pybind11/pybind11.h>

#include "common.h"
#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "headkv-engine CPU kernels (ragged per-head KV cache attention)";
  m.def(
      "decode_attention",
      [](uintptr_t q, uintptr_t q_sink, uintptr_t k_pool, uintptr_t v_pool, uintptr_t base, uintptr_t length,
         uintptr_t sink_size, uintptr_t fill, uintptr_t out, int64_t batch, int64_t heads, int64_t head_dim,
         int64_t pool_rows, int q_dtype, int kv_dtype, float scale, uintptr_t pos_pool, uintptr_t query_position,
         int64_t stat_sink, int64_t stat_local, uintptr_t stats) {
        headkv::read_isa_request();  // (under the GIL)
        py::gil_scoped_release release;
        headkv::decode_attention(ptr<const void>(q), ptr<const void>(q_sink), ptr<const void>(k_pool),
                                 ptr<const void>(v_pool), ptr<const int64_t>(base), ptr<const int64_t>(length),
                                 ptr<const int64_t>(sink_size), ptr<const float>(fill), ptr<void>(out), batch, heads,
                                 head_dim, pool_rows, q_dtype, kv_dtype, scale, ptr<const int64_t>(pos_pool),
                                 ptr<const int64_t>(query_position), stat_sink, stat_local, ptr<float>(stats));
      },
      py::arg("q"), py::arg("q_sink"), py::arg("k_pool"), py::arg("v_pool"), py::arg("base"), py::arg("length"),
      py::arg("sink_size"), py::arg("fill"), py::arg("out"), py::arg("batch"), py::arg("heads"), py::arg("head_dim"),
      py::arg("pool_rows"), py::arg("q_dtype"), py::arg("kv_dtype"), py::arg("scale"), py::arg("pos_pool") = 0,
      py::arg("query_position") = 0, py::arg("stat_sink") = 4, py::arg("stat_local") = 8, py::arg("stats") = 0,
      "Ragged decode attention (see headkv_engine.ops.decode_attention). Pointers are data addresses (0 = absent:\n"
      "q_sink, sink_size, fill, and stats: fp32 [B, H, 3] entropy / sink mass / local mass of the step, which\n"
      "needs pos_pool and query_position); dtype codes: 0 fp32, 1 bf16, 2 fp16.");
  m.def(
      "prefill_attention",
      [](uintptr_t q, uintptr_t q_sink, uintptr_t k, uintptr_t v, uintptr_t positions, uintptr_t k_pool,
         uintptr_t v_pool, uintptr_t pos_pool, uintptr_t base, uintptr_t length, uintptr_t sink_size,
         uintptr_t window_size, uintptr_t fill, uintptr_t out, int64_t batch, int64_t heads, int64_t tokens,
         int64_t head_dim, int64_t pool_rows, int q_dtype, int kv_dtype, float scale) {
        headkv::read_isa_request();  // (under the GIL)
        py::gil_scoped_release release;
        headkv::prefill_attention(ptr<const void>(q), ptr<const void>(q_sink), ptr<const void>(k), ptr<const void>(v),
                                  ptr<const int64_t>(positions), ptr<const void>(k_pool), ptr<const void>(v_pool),
                                  ptr<const int64_t>(pos_pool), ptr<const int64_t>(base), ptr<const int64_t>(length),
                                  ptr<const int64_t>(sink_size), ptr<const int64_t>(window_size),
                                  ptr<const float>(fill), ptr<void>(out), batch, heads, tokens, head_dim, pool_rows,
                                  q_dtype, kv_dtype, scale);
      },
      py::arg("q"), py::arg("q_sink"), py::arg("k"), py::arg("v"), py::arg("positions"), py::arg("k_pool"),
      py::arg("v_pool"), py::arg("pos_pool"), py::arg("base"), py::arg("length"), py::arg("sink_size"),
      py::arg("window_size"), py::arg("fill"), py::arg("out"), py::arg("batch"), py::arg("heads"), py::arg("tokens"),
      py::arg("head_dim"), py::arg("pool_rows"), py::arg("q_dtype"), py::arg("kv_dtype"), py::arg("scale"),
      "Masked prefill attention (see headkv_engine.ops.prefill_attention). q, k, v and q_sink share q_dtype;\n"
      "0 = absent for q_sink and fill.");
  m.def(
      "append",
      [](uintptr_t k_pool, uintptr_t v_pool, uintptr_t pos_pool, uintptr_t base, uintptr_t k, uintptr_t v,
         uintptr_t positions, uintptr_t sink_size, uintptr_t window_size, int64_t batch, int64_t heads,
         int64_t tokens, int64_t head_dim, int64_t pool_rows, int kv_dtype, int new_dtype) {
        headkv::read_isa_request();  // (under the GIL)
        py::gil_scoped_release release;
        headkv::append(ptr<void>(k_pool), ptr<void>(v_pool), ptr<int64_t>(pos_pool), ptr<const int64_t>(base),
                       ptr<const void>(k), ptr<const void>(v), ptr<const int64_t>(positions),
                       ptr<const int64_t>(sink_size), ptr<const int64_t>(window_size), batch, heads, tokens, head_dim,
                       pool_rows, kv_dtype, new_dtype);
      },
      py::arg("k_pool"), py::arg("v_pool"), py::arg("pos_pool"), py::arg("base"), py::arg("k"), py::arg("v"),
      py::arg("positions"), py::arg("sink_size"), py::arg("window_size"), py::arg("batch"), py::arg("heads"),
      py::arg("tokens"), py::arg("head_dim"), py::arg("pool_rows"), py::arg("kv_dtype"), py::arg("new_dtype"),
      "Write new keys/values into the ragged layout, in place (see headkv_engine.ops.append).");
  m.def(
      "head_statistics",
      [](uintptr_t q, uintptr_t k, int64_t heads, int64_t tokens_q, int64_t tokens_k, int64_t head_dim, int dtype,
         int64_t q_start, float scale, int64_t sink_size, int64_t local_window, double recent_ratio,
         int64_t min_query, int64_t log2_bins, uintptr_t sums) {
        headkv::read_isa_request();  // (under the GIL)
        py::gil_scoped_release release;
        headkv::head_statistics(ptr<const void>(q), ptr<const void>(k), heads, tokens_q, tokens_k, head_dim, dtype,
                                q_start, scale, sink_size, local_window, recent_ratio, min_query, log2_bins,
                                ptr<double>(sums));
      },
      "Per-head attention statistic sums (see headkv_engine.ops.head_statistics).");
  m.def(
      "cpu_isa",
      [] {
        headkv::read_isa_request();
        return headkv::use_avx2() ? "avx2" : "baseline";
      },
      "Which build of the attention kernels runs here: 'avx2' (AVX2/FMA/F16C) or 'baseline'\n"
      "(HEADKV_CPU_BASELINE=1 forces the baseline).");
  m.def("head_statistics_fields", &headkv::head_statistics_fields, "Doubles per head in head_statistics' output.");
}
