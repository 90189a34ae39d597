"""The C++ CPU kernels on inputs outside the happy path: NaN, allocation failures, out-of-range indices, mixed dtypes.

Helpers of csrc/ are also compiled here on their own with the undefined-behaviour sanitizer (a C++ compiler is
needed, as for the build), so undefined behaviour fails a test instead of passing by luck.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_ops import SINKS, TOL, WINDOWS, ext, filled_cache, left_padded

from headkv_engine import ops
from headkv_engine.ops.prefill import visible
from headkv_engine.ops.statistics import head_statistics

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def run_sanitized(tmp_path, source: str, *extra_sources: str) -> str:
    """Compiles `source` (a C++ main) with csrc/ on the include path and UBSan, runs it; returns its stdout."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (needed to build the extension too)")
    main = tmp_path / "main.cpp"
    main.write_text(textwrap.dedent(source))
    binary = tmp_path / "main"
    flags = ["-std=c++17", "-O1", "-fopenmp", "-fsanitize=undefined,float-cast-overflow",
             "-fno-sanitize-recover=all", f"-I{CSRC}"]
    subprocess.run([compiler, *flags, str(main), *(str(CSRC / s) for s in extra_sources), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return done.stdout


# ---- the fast exp ------------------------------------------------------------------------------------------

def test_exp_le0_is_defined_for_nan_and_accurate(tmp_path):
    out = run_sanitized(tmp_path, """
        #include <cstdio>
        #include "common.h"
        int main() {
          volatile float nan = std::numeric_limits<float>::quiet_NaN();
          std::printf("nan %d\\n", headkv::exp_le0(nan) != headkv::exp_le0(nan));
          std::printf("-inf %g\\n", headkv::exp_le0(-std::numeric_limits<float>::infinity()));
          std::printf("-100 %g\\n", headkv::exp_le0(-100.f));
          double worst = 0;
          for (int i = 0; i <= 86000; ++i) {
            volatile float x = -i * 1e-3f;
            const double want = std::exp(static_cast<double>(x));
            worst = std::max(worst, std::abs(headkv::exp_le0(x) - want) / want);
          }
          std::printf("rel %g\\n", worst);
        }
    """)
    got = dict(line.split() for line in out.splitlines())
    assert got["nan"] == "1", "exp_le0(NaN) must be NaN"
    assert float(got["-inf"]) == 0.0 and float(got["-100"]) == 0.0
    assert float(got["rel"]) < 5e-7


# ---- NaN inputs --------------------------------------------------------------------------------------------
# A NaN in a key or query makes NaN every output that attends to it (as dense attention would), and only those;
# outputs with no visible key (pruned heads, padding queries) still get their fill.

NAN_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "metal"])
@pytest.mark.parametrize("dtype", NAN_DTYPES)
def test_prefill_nan_key_or_query_gives_nan_where_seen(isa, backend, dtype):
    gen = torch.Generator().manual_seed(3)
    seen, pad, tokens, head_dim = [20, 4], [0, 5], 40, 16
    (k_pool, v_pool, pos_pool), base, length = filled_cache(seen, head_dim, dtype, gen)
    q, k, v = (torch.randn(2, len(SINKS), tokens, head_dim, generator=gen).to(dtype) for _ in range(3))
    positions = left_padded(seen, pad, tokens)
    nan_key, nan_query, nan_row = 10, 30, int(base[0, 0]) + 7  # a new key, a query, a cached key of head 0
    k[0, :, nan_key, 3] = float("nan")
    q[1, :, nan_query, 5] = float("nan")
    k_pool[nan_row, 2] = float("nan")
    fill = torch.randn(len(SINKS), head_dim, generator=gen)
    args = (q, k, v, positions, k_pool, v_pool, pos_pool, base, length, SINKS, WINDOWS)
    got = ops.prefill_attention(*args, scale=0.25, fill=fill, backend=backend)

    q_pos = positions[:, None, :]  # [B, 1, T]
    sinks, windows = SINKS[None, :, None], WINDOWS[None, :, None]
    want_nan = torch.zeros(2, len(SINKS), tokens, dtype=torch.bool)
    want_nan[0] = visible(q_pos[0], positions[0, nan_key], sinks[0], windows[0])
    want_nan[0, 0] |= visible(q_pos[0, 0], pos_pool[nan_row], SINKS[0], WINDOWS[0])
    want_nan[1, :, nan_query] = SINKS + WINDOWS > 0  # the query sees itself, unless its head is pruned
    assert want_nan[0].any() and (~want_nan[0, :, pad[0]:]).any()  # both kinds of rows are checked
    assert torch.equal(got.isnan().any(-1), want_nan)
    assert torch.equal(got.isnan().all(-1), want_nan)
    no_key = (positions < 0)[:, None, :] | (SINKS + WINDOWS == 0)[None, :, None]  # padding, pruned heads
    torch.testing.assert_close(got[no_key].float(), fill[None, :, None, :].expand_as(got)[no_key].to(dtype).float())
    if backend != "torch":  # the finite rows still agree with the reference
        want = ops.prefill_attention_reference(*args, scale=0.25, fill=fill)
        torch.testing.assert_close(got[~want_nan].float(), want[~want_nan].float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "metal"])
@pytest.mark.parametrize("dtype", NAN_DTYPES)
def test_decode_nan_key_or_query_gives_nan_where_seen(isa, backend, dtype):
    gen = torch.Generator().manual_seed(4)
    head_dim = 16
    (k_pool, v_pool, pos_pool), base, length = filled_cache([700, 30], head_dim, dtype, gen)
    q = torch.randn(2, len(SINKS), head_dim, generator=gen).to(dtype)
    k_pool[int(base[0, 0]) + 600, 1] = float("nan")  # head 0 of sequence 0 (a full head: past the first chunk)
    q[1, 4, 0] = float("nan")
    fill = torch.randn(len(SINKS), head_dim, generator=gen)
    kwargs = dict(scale=0.25, fill=fill, return_stats=True, pos_pool=pos_pool, query_position=torch.tensor([700, 30]))
    out, stats = ops.decode_attention(q, k_pool, v_pool, base, length, backend=backend, **kwargs)
    want_nan = torch.zeros(2, len(SINKS), dtype=torch.bool)
    want_nan[0, 0] = want_nan[1, 4] = True
    assert torch.equal(out.isnan().any(-1), want_nan) and torch.equal(out.isnan().all(-1), want_nan)
    assert torch.equal(stats[..., 0].isnan(), want_nan)  # the entropy of the step
    empty = length == 0  # the pruned head
    assert empty.any()
    torch.testing.assert_close(out[empty].float(), fill.expand_as(out)[empty].to(dtype).float(),
                               atol=TOL[dtype], rtol=TOL[dtype])  # the interpreter rounds to bf16 its own way


# ---- mixed dtypes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_dtype,k_dtype,k_scale", [
    (torch.bfloat16, torch.float32, 3.0),   # k keeps its fp32 precision
    (torch.float16, torch.bfloat16, 1e5),   # fp16 cannot hold these keys: both go to fp32
    (torch.float32, torch.float16, 1.0),
])
def test_statistics_of_mixed_dtypes_match_the_reference(isa, q_dtype, k_dtype, k_scale):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 40, 16, generator=gen).to(q_dtype)
    k = (torch.randn(3, 40, 16, generator=gen) * k_scale).to(k_dtype)
    scale = 0.25 / k_scale
    got = head_statistics(q, k, 0, scale=scale, backend="cpu")
    want = head_statistics(q, k, 0, scale=scale, backend="torch")  # fp64 from each input's own dtype
    for key in ("entropy", "max_prob", "regions", "relative"):
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("q_dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_prefill_reference_reads_wider_pools_at_their_precision(isa, q_dtype, tol):
    """fp32 pools under a half-precision block: the reference, like the kernel, does not round the cached rows."""
    gen = torch.Generator().manual_seed(6)
    seen, tokens, head_dim = [50], 8, 16
    (k_pool, v_pool, pos_pool), base, length = filled_cache(seen, head_dim, torch.float32, gen)
    k_pool *= 8  # large scores: a rounding of the keys moves the softmax well past the output's rounding
    q, k, v = (torch.randn(1, len(SINKS), tokens, head_dim, generator=gen).to(q_dtype) for _ in range(3))
    args = (q, k, v, left_padded(seen, [0], tokens), k_pool, v_pool, pos_pool, base, length, SINKS, WINDOWS)
    got = ops.prefill_attention(*args, scale=0.5, backend="cpu")
    want = ops.prefill_attention_reference(*args, scale=0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


# ---- append: rows from huge or negative bases and slots ----------------------------------------------------

INT64_MAX = (1 << 63) - 1


@pytest.mark.parametrize("base,position,sink,message", [
    (-1, 1, 0, r"base -1 of sequence 0, head 0 plus slot 1 \(position 1\)"),  # base + slot = row 0: still refused
    (INT64_MAX, 5, 0, rf"base {INT64_MAX} of sequence 0, head 0 plus slot 1 "),  # base + slot overflows
    (1 << 62, 1 << 62, (1 << 62) + 1, rf"base {1 << 62} .* plus slot {1 << 62} "),  # a sink slot: overflows too
])
def test_append_refuses_a_row_from_a_bad_base_or_slot(base, position, sink, message):
    pools = [torch.zeros(4, 8), torch.zeros(4, 8), torch.full((4,), -1)]
    k = torch.randn(1, 1, 1, 8)
    with pytest.raises(ValueError, match=message + r".*outside the pools' 4 rows"):
        ops.append(*pools, torch.tensor([[base]]), k, k, torch.tensor([[position]]), torch.tensor([sink]),
                   torch.tensor([4]), backend="cpu")
    assert torch.equal(pools[0], torch.zeros(4, 8)) and (pools[2] == -1).all()  # nothing written


def test_append_bounds_checks_are_free_of_overflow(tmp_path):
    """base + slot and last - window of huge values: a clear error, and no signed overflow on the way (UBSan)."""
    out = run_sanitized(tmp_path, """
        #include <cstdio>
        #include <limits>
        #include <stdexcept>
        #include "kernels.h"
        int main() {
          const int64_t big = std::numeric_limits<int64_t>::max();
          float pool[4 * 2] = {}, k[2] = {1, 2};
          int64_t pos_pool[4] = {-1, -1, -1, -1};
          struct Case { int64_t base, position, sink, window; };
          // base + slot overflows (window, sink slot), a negative base brought into range, padding under a huge window
          const Case cases[] = {{big, 5, 0, 4}, {big - 1, 3, 4, 0}, {-1, 1, 0, 2}, {0, -5, 0, big}};
          for (const Case& c : cases) {
            try {
              headkv::append(pool, pool, pos_pool, &c.base, k, k, &c.position, &c.sink, &c.window, 1, 1, 1, 2, 4,
                             0, 0);
              std::printf("accepted\\n");
            } catch (const std::invalid_argument&) {
              std::printf("refused\\n");
            }
          }
          std::printf("untouched %d\\n", pos_pool[0] == -1 && pos_pool[1] == -1 && pos_pool[2] == -1 &&
                                         pos_pool[3] == -1);
        }
    """, "append.cpp")
    assert out.split() == ["refused", "refused", "refused", "accepted", "untouched", "1"]


# ---- working memory that cannot be allocated ---------------------------------------------------------------
# Sizes no allocator can serve (the per-thread buffers would exceed what a std::vector can hold), given straight
# to the extension: the kernel must raise MemoryError before it reads a value, rather than let the failure leave
# an OpenMP region (std::terminate: the process dies). Each case runs in a subprocess so a crash fails only it.

HUGE_DIM = 1 << 58  # x 16 query lanes (prefill) or x 4 bytes: past any std::vector's max_size

ALLOCATION_CASES = {
    "decode_attention": """
        ext.decode_attention(ptr(buf), 0, ptr(buf), ptr(buf), ptr(zero), ptr(zero), 0, 0, ptr(buf), 1, 1, HUGE, 0,
                             0, 0, 1.0)""",
    "prefill_attention": """
        ext.prefill_attention(ptr(buf), 0, ptr(buf), ptr(buf), ptr(zero), ptr(buf), ptr(buf), ptr(zero), ptr(zero),
                              ptr(zero), ptr(one), ptr(one), 0, ptr(buf), 1, 1, 1, HUGE, 0, 0, 0, 1.0)""",
    "append": """
        ext.append(ptr(buf), ptr(buf), ptr(zero), ptr(zero), ptr(buf), ptr(buf), ptr(zero), ptr(one), ptr(zero), 1,
                   1, 1, HUGE * 16, 1, 1, 0)""",
    "head_statistics": """
        ext.head_statistics(ptr(buf), ptr(buf), 1, 1, 1 << 40, HUGE >> 20, 0, (1 << 40) - 1, 1.0, 4, 8, 0.1, 0, 41,
                            ptr(sums))""",
}


def run_extension(script: str) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter with `ext` (the compiled module alone, without torch), `ptr`, and
    small ctypes buffers: buf (floats), zero / one (int64 0 / 1), sums (doubles, filled with 7)."""
    module = ext()
    prelude = f"""
        import ctypes, importlib.machinery, importlib.util
        loader = importlib.machinery.ExtensionFileLoader({module.__name__!r}, {module.__file__!r})
        ext = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
        loader.exec_module(ext)
        ptr = ctypes.addressof
        HUGE = {HUGE_DIM}
        buf, zero, one = (ctypes.c_float * 64)(), (ctypes.c_int64 * 4)(0), (ctypes.c_int64 * 4)(1)
        sums = (ctypes.c_double * 256)(*([7.0] * 256))
    """
    code = textwrap.dedent(prelude) + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kernel", list(ALLOCATION_CASES))
def test_working_memory_that_cannot_be_allocated_is_a_memory_error(kernel):
    call = textwrap.indent(textwrap.dedent(ALLOCATION_CASES[kernel]).strip(), "    ")
    done = run_extension(f"try:\n{call}\nexcept MemoryError as e:\n    print('MemoryError:', e)\n")
    assert done.returncode == 0, f"the process died (exit {done.returncode}): {done.stderr[-2000:]}"
    assert f"MemoryError: {kernel}: cannot allocate the working memory" in done.stdout


def test_statistics_with_no_query_counted_allocate_and_read_nothing():
    """min_query past every query: zero sums at once (no key converted, no working memory)."""
    done = run_extension("""
        ext.head_statistics(ptr(buf), ptr(buf), 1, 1, 1 << 40, HUGE >> 20, 0, (1 << 40) - 1, 1.0, 4, 8, 0.1,
                            1 << 41, 41, ptr(sums))
        fields = ext.head_statistics_fields(41)
        print(list(sums[:fields]) == [0.0] * fields, sums[fields] == 7.0)
    """)
    assert done.returncode == 0, f"the process died (exit {done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.split() == ["True", "True"]


# ---- which build runs ----------------------------------------------------------------------------------------

def test_the_baseline_switch_is_read_at_each_call(monkeypatch):
    """HEADKV_CPU_BASELINE is read by every call (under the GIL), so one process runs both builds."""
    module = ext()
    monkeypatch.setenv("HEADKV_CPU_BASELINE", "1")
    assert module.cpu_isa() == "baseline"
    monkeypatch.delenv("HEADKV_CPU_BASELINE")
    flags = set()
    if Path("/proc/cpuinfo").exists():
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    if {"avx2", "fma", "f16c"} <= flags:
        assert module.cpu_isa() == "avx2"
    monkeypatch.setenv("HEADKV_CPU_BASELINE", "1")
    assert module.cpu_isa() == "baseline"


@pytest.mark.parametrize("source", ["decode.cpp", "prefill.cpp", "head_statistics.cpp", "append.cpp"])
def test_no_avx2_clone_turns_off_every_avx2_build(tmp_path, source):
    """-DHEADKV_NO_AVX2_CLONE leaves the baseline build alone in every kernel (no file redefines the switch)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (needed to build the extension too)")
    obj = tmp_path / "kernel.o"
    subprocess.run([compiler, "-std=c++17", "-O0", "-fopenmp", "-DHEADKV_NO_AVX2_CLONE", f"-I{CSRC}", "-c",
                    str(CSRC / source), "-o", str(obj)], check=True, capture_output=True, text=True)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the object's symbols")
    symbols = subprocess.run([nm, "-C", str(obj)], check=True, capture_output=True, text=True).stdout
    clones = [s for s in symbols.splitlines() if re.search(r"\b(head|chunk|block)_avx2\b|_f16c\b", s)]
    assert not clones


@pytest.mark.parametrize("backend", ["torch", "triton", "metal"])
def test_append_checked_in_python_refuses_a_negative_base_whose_row_lands_inside(backend):
    pools = [torch.zeros(4, 8), torch.zeros(4, 8), torch.full((4,), -1)]
    k = torch.randn(1, 1, 1, 8)
    message = r"base: token 0 of \(sequence 0, head 0\) goes to row 0 from base -1, outside"
    with pytest.raises(ValueError, match=message):
        ops.append(*pools, torch.tensor([[-1]]), k, k, torch.tensor([[1]]), torch.tensor([0]), torch.tensor([4]),
                   backend=backend)
    assert torch.equal(pools[0], torch.zeros(4, 8)) and (pools[2] == -1).all()  # nothing written


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "metal"])
def test_nan_rows_of_one_head_reach_no_other_head(isa, backend):
    """A head's NaN key and value rows (a sequence that overflowed) stay out of every other (sequence, head): no
    backend reads rows outside a head's own, the reference's padded slots included."""
    gen = torch.Generator().manual_seed(7)
    head_dim, seen = 16, [30, 9]
    (k_pool, v_pool, pos_pool), base, length = filled_cache(seen, head_dim, torch.float32, gen)
    sick = (0, 0)  # the full head of sequence 0
    rows = slice(int(base[sick]), int(base[sick] + length[sick]))
    k_pool[rows], v_pool[rows] = float("nan"), float("nan")
    others = torch.ones_like(length, dtype=torch.bool)
    others[sick] = False
    q = torch.randn(2, len(SINKS), head_dim, generator=gen)
    out = ops.decode_attention(q, k_pool, v_pool, base, length, scale=0.25, backend=backend)
    assert out[sick].isnan().all() and not out[others].isnan().any()
    block = torch.randn(3, 2, len(SINKS), 4, head_dim, generator=gen)
    positions = torch.stack([torch.arange(n, n + 4) for n in seen])
    got = ops.prefill_attention(*block, positions, k_pool, v_pool, pos_pool, base, length, SINKS, WINDOWS,
                                scale=0.25, backend=backend)
    assert got[sick].isnan().all() and not got[others].isnan().any()
