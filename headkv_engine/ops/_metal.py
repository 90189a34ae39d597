"""Calls into the Metal kernels of kernels/metal: on Apple MPS through `torch.mps.compile_shader`, and on CPU
tensors, when HEADKV_METAL_EMULATE=1, through `headkv_engine.metal_emulator` (the same sources, compiled for the
CPU: how CI tests them).

The dispatchers in this package have checked shapes, dtypes and devices. Each op's source is compiled once per
process (the shared common.metal first); a kernel is instantiated per (query dtype, pool dtype) and named
`headkv_<op>_<query type>_<pool type>`. Scalars travel as two small buffers (int64 `ints`, float32 `floats`);
absent optional tensors are replaced by a buffer the kernel never reads (a flag in `ints` says so).
"""

from __future__ import annotations

import functools
import re

import torch

from headkv_engine.kernel_sources import kernels_dir

TYPE_NAMES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}
SIMD_WIDTH = 32
DECODE_CHUNK_ROWS = 512  # rows per decode threadgroup: a head of more is split (4 SIMD groups x 128 rows)


@functools.cache
def source(op: str) -> str:
    folder = kernels_dir() / "metal"
    return (folder / "common.metal").read_text() + "\n" + (folder / f"{op}.metal").read_text()


def kernel_name(op: str, query_dtype: torch.dtype, pool_dtype: torch.dtype) -> str:
    return f"headkv_{op}_{TYPE_NAMES[query_dtype]}_{TYPE_NAMES[pool_dtype]}"


@functools.cache
def defined(op: str, name: str) -> int:
    """An integer the op's source #defines (the sizes the launcher must agree with)."""
    found = re.search(rf"^#define {name} (\d+)", source(op), flags=re.MULTILINE)
    if found is None:
        raise RuntimeError(f"kernels/metal/{op}.metal defines no {name}")
    return int(found.group(1))


def simds_per_group(op: str) -> int:
    """SIMD groups per threadgroup (<OP>_SIMDS)."""
    return defined(op, f"{op.upper()}_SIMDS")


@functools.cache
def instantiated_kernels(op: str) -> list[str]:
    """The kernel names the op's source instantiates: a line `HEADKV_<KERNEL>(query type, pool type)` each (one type
    where both are the same), named headkv_<kernel>_<query type>_<pool type>."""
    found = re.findall(r"^HEADKV_(\w+)\((\w+)(?:, (\w+))?\)$", source(op), flags=re.MULTILINE)
    return [f"headkv_{kernel.lower()}_{query}_{pool or query}" for kernel, query, pool in found]


@functools.cache
def library(op: str, device_type: str):
    """The compiled kernels of one op for `device_type` ('mps', or 'cpu' for the emulator)."""
    if device_type == "mps":
        return torch.mps.compile_shader(source(op))
    from headkv_engine.metal_emulator import EmulatedLibrary  # noqa: PLC0415

    return EmulatedLibrary(source(op), instantiated_kernels(op))


@functools.lru_cache(maxsize=512)
def _constants(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # cached: a decode step passes the same scalars to every layer; the kernels only read these buffers
    return torch.tensor(values, dtype=dtype, device=device)


def _ints(values, device) -> torch.Tensor:
    return _constants(tuple(int(v) for v in values), torch.int64, device)


def _floats(values, device) -> torch.Tensor:
    return _constants(tuple(float(v) for v in values), torch.float32, device)


@functools.lru_cache(maxsize=16)
def _unused_output(device: torch.device) -> torch.Tensor:
    """Bound where a kernel has an output it does not write in this call (a flag in `ints` says so): never one of
    the cached constants, which a write would corrupt for every later call."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _launch(op: str, dtypes, groups: int | tuple, buffers, name: str | None = None) -> None:
    """Run kernel headkv_<name or op>_<types> of the op's library over `groups` threadgroups."""
    device = buffers[0].device
    groups = (groups, 1, 1) if isinstance(groups, int) else groups
    if 0 in groups:
        return
    threads_per_group = simds_per_group(op) * SIMD_WIDTH
    kernel_id = kernel_name(name or op, *dtypes)
    if kernel_id not in instantiated_kernels(op):
        raise RuntimeError(f"kernels/metal/{op}.metal has no kernel {kernel_id}")
    compiled = library(op, device.type)
    try:
        kernel = getattr(compiled, kernel_id)
    except (AttributeError, RuntimeError) as exc:  # bfloat kernels exist from Metal 3.1 (macOS 14) on
        raise RuntimeError(f"backend 'metal': this Metal version has no {kernel_id} ({exc}); bfloat16 needs "
                           "macOS 14, other dtypes work everywhere") from exc
    width = getattr(kernel, "thread_execution_width", SIMD_WIDTH)
    if width != SIMD_WIDTH:  # Apple GPUs run 32 lanes; an AMD GPU of an Intel Mac may not, and the kernels assume 32
        raise RuntimeError(f"backend 'metal': the kernels need SIMD groups of {SIMD_WIDTH} lanes, this GPU runs "
                           f"{width}; use backend='torch'")
    # threads: the whole grid (Metal's dispatchThreads), here always whole threadgroups
    threads = (groups[0] * threads_per_group, groups[1], groups[2])
    kernel(*buffers, threads=threads, group_size=(threads_per_group, 1, 1))


def check_head_dim(head_dim: int) -> None:
    most = defined("decode", "HEADKV_MAX_HEAD_DIM")  # (common.metal: each lane holds up to 8 dimensions)
    if head_dim > most:
        raise ValueError(f"head_dim: the Metal kernels serve heads of up to {most} dimensions, got {head_dim}")


@torch.compiler.disable  # host-side launch: never traced, always run eagerly
def decode_attention(q, k_pool, v_pool, base, length, scale, sink_size=None, q_sink=None, fill=None, stats=None,
                     max_length=None, chunk=DECODE_CHUNK_ROWS):
    """stats: None, or (pos_pool [N], query_position [B], stat_sink, stat_local); then returns (out, [B, H, 3]).

    max_length: an upper bound of `length` known on the host (else read from the device; a head is cut at it,
    as the Triton launch cuts it). When a head has more than `chunk` rows, every head of the call is split into
    chunks of that many (one threadgroup each) and merged by a second launch.
    """
    batch, heads, head_dim = q.shape
    check_head_dim(head_dim)
    q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
    base, length = base.contiguous(), length.contiguous()
    max_len = max_length if max_length is not None else (int(length.max()) if length.numel() else 0)
    num_chunks = max(1, -(-max_len // chunk))
    split = num_chunks > 1
    out = torch.empty_like(q)
    floats = _floats((scale,), q.device)
    stat_sink, stat_local = 4, 8
    pos_pool = query_position = base
    stats_out = _unused_output(q.device)
    if stats is not None:
        pos_pool, query_position, stat_sink, stat_local = stats
        pos_pool, query_position = pos_pool.contiguous(), query_position.contiguous()
        stats_out = torch.empty(batch, heads, 3, dtype=torch.float32, device=q.device)
    chunk_state = chunk_acc = _unused_output(q.device)
    if split:
        state_size = defined("decode", "DECODE_STATE")  # m, l and the statistics' three sums
        chunk_state = torch.empty(batch * heads, num_chunks, state_size, dtype=torch.float32, device=q.device)
        chunk_acc = torch.empty(batch * heads, num_chunks, head_dim, dtype=torch.float32, device=q.device)
    ints = _ints((heads, head_dim, q_sink is not None, fill is not None, stats is not None, stat_sink, stat_local,
                  chunk if split else max(1, max_len), split, num_chunks, max_len), q.device)
    fill = floats if fill is None else fill.float().contiguous()
    _launch("decode", (q.dtype, k_pool.dtype), (batch * heads, num_chunks, 1), [
        q, q if q_sink is None else q_sink.contiguous(), k_pool, v_pool, base, length,
        base if sink_size is None else sink_size.contiguous(), fill, pos_pool, query_position, ints, floats, out,
        stats_out, chunk_state, chunk_acc,
    ])
    if split:
        _launch("decode", (q.dtype, q.dtype), batch * heads, [length, fill, chunk_state, chunk_acc, ints, out,
                                                                stats_out], name="decode_merge")
    return out if stats is None else (out, stats_out)


@torch.compiler.disable  # host-side launch: never traced, always run eagerly
def prefill_attention(q, k, v, positions, k_pool, v_pool, pos_pool, base, length, sink_size, window_size, scale,
                      q_sink=None, fill=None):
    batch, heads, tokens, head_dim = q.shape
    check_head_dim(head_dim)
    q, k, v, positions = q.contiguous(), k.contiguous(), v.contiguous(), positions.contiguous()
    k_pool, v_pool, pos_pool = k_pool.contiguous(), v_pool.contiguous(), pos_pool.contiguous()
    base, length = base.contiguous(), length.contiguous()
    sink_size, window_size = sink_size.contiguous(), window_size.contiguous()
    out = torch.empty_like(q)
    floats = _floats((scale,), q.device)
    ints = _ints((heads, head_dim, tokens, q_sink is not None, fill is not None), q.device)
    query_tiles = -(-tokens // simds_per_group("prefill"))  # one SIMD group per query
    _launch("prefill", (q.dtype, k_pool.dtype), (query_tiles, heads, batch), [
        q, q if q_sink is None else q_sink.contiguous(), k, v, positions, k_pool, v_pool, pos_pool, base, length,
        sink_size, window_size, floats if fill is None else fill.float().contiguous(), ints, floats, out,
    ])
    return out


@torch.compiler.disable  # host-side launch: never traced, always run eagerly
def append(k_pool, v_pool, pos_pool, base, k, v, positions, sink_size, window_size):
    """In place: the pools must already be contiguous (the dispatcher checks)."""
    batch, heads, tokens, head_dim = k.shape
    k, v, positions = k.contiguous(), v.contiguous(), positions.contiguous()
    base, sink_size, window_size = base.contiguous(), sink_size.contiguous(), window_size.contiguous()
    ints = _ints((heads, head_dim, tokens, k_pool.shape[0]), k.device)
    token_tiles = -(-tokens // simds_per_group("append"))  # one SIMD group per token
    _launch("append", (k.dtype, k_pool.dtype), (token_tiles, heads, batch), [
        k, v, positions, base, sink_size, window_size, ints, k_pool, v_pool, pos_pool,
    ])


@torch.compiler.disable  # host-side launch: never traced, always run eagerly
def head_statistics(q, k, recent_start, q_start, scale, sink_size, local_window, min_query, bins, fields):
    """Sums of ops.statistics for one sequence block: fp64 rows [H, fields] on the CPU (layout: ops.statistics).
    The kernel writes one fp32 row per query; they are added here in fp64, which MPS does not have."""
    heads, tokens_q, head_dim = q.shape
    check_head_dim(head_dim)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    q, k, recent_start = q.contiguous(), k.contiguous(), recent_start.contiguous()
    if fields > defined("statistics", "STATISTICS_MAX_FIELDS"):
        raise ValueError(f"head_statistics: {fields} fields exceed the Metal kernel's "
                         f"{defined('statistics', 'STATISTICS_MAX_FIELDS')}")
    rows = torch.empty(heads, tokens_q, fields, dtype=torch.float32, device=q.device)
    ints = _ints((heads, head_dim, tokens_q, k.shape[1], q_start, sink_size, local_window, min_query, bins, fields),
                 q.device)
    query_tiles = -(-tokens_q // simds_per_group("statistics"))  # one SIMD group per query
    _launch("statistics", (q.dtype, q.dtype), (query_tiles, heads, 1), [q, k, recent_start, ints,
                                                                        _floats((scale,), q.device), rows])
    return rows.cpu().double().sum(1)
