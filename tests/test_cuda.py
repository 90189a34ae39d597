"""CUDA-only checks: the Triton backend on a real GPU, at shapes the interpreter cannot afford."""

import pytest
import torch
from reference_model import reference_logits, tiny_model

import headkv_engine as hk
from headkv_engine import ops
from headkv_engine.kernel_sources import triton_module
from headkv_engine.quickstart import seed_mix_profile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_long_context_seed_mix(dtype):
    heads, head_dim, context, batch = 32, 80, 8192, 2
    sink, window, _ = seed_mix_profile(1, heads, head_dim).layer_tensors(0, device="cuda")
    kept = torch.minimum(torch.tensor(context, device="cuda"), sink + window).expand(batch, heads).contiguous()
    capacity = kept.flatten()
    base = (torch.cumsum(capacity, 0) - capacity).view(batch, heads)
    rows = int(capacity.sum())
    k_pool, v_pool = (torch.randn(rows, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
    got = ops.decode_attention(q, k_pool, v_pool, base, kept, scale=head_dim**-0.5, backend="triton")
    want = ops.decode_attention_reference(q, k_pool, v_pool, base, kept, scale=head_dim**-0.5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_windowed_prefill_long_sequence(dtype):
    heads, head_dim, tokens = 4, 80, 3000
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    positions = torch.arange(tokens, device="cuda")[None]
    empty = torch.zeros(0, head_dim, device="cuda", dtype=dtype)
    none = torch.zeros(1, heads, dtype=torch.long, device="cuda")
    sink = torch.tensor([4, 0, 4, 0], device="cuda")
    window = torch.tensor([8, 1, 300, 1 << 40], device="cuda")
    args = (q, k, v, positions, empty, empty, torch.zeros(0, dtype=torch.long, device="cuda"), none, none, sink, window)
    got = ops.prefill_attention(*args, scale=head_dim**-0.5, backend="triton")
    want = ops.prefill_attention_reference(*args, scale=head_dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("position_mode", ["absolute", "shifted"])
def test_patched_model_on_cuda(position_mode):
    from test_model import mixed_profile, stepwise_logits  # noqa: PLC0415

    model = tiny_model(2, 4, 16).cuda()
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1)).cuda()
    profile = mixed_profile(fill=True)
    ref = reference_logits(model, profile, ids, mode=position_mode)
    with hk.patch_model(model, profile, backend="auto", position_mode=position_mode) as handle:
        assert handle.backend == "auto"
        got, cache = stepwise_logits(model, ids, first=9)
        generated = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    assert cache.stores[0].k_pool.is_cuda
    assert (got - ref).abs().max() <= 1e-3
    assert generated.shape == (2, 13)


def test_beam_search_on_cuda():
    """Beam search through the Triton kernels on CUDA equals beam search over the reference attention."""
    from test_model import mixed_profile, reference_generate  # noqa: PLC0415

    model = tiny_model(2, 4, 16).cuda()
    prompt = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(11)).cuda()
    profile = mixed_profile()
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, num_beams=3, do_sample=False)
    with hk.patch_model(model, profile, backend="triton"):
        got = model.generate(prompt, **kwargs)
    assert torch.equal(got, reference_generate(model, profile, prompt, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_head_statistics_long_sequence(dtype):
    """The Triton statistics kernel at pythia-160m's head shape over 1500 tokens (many query and key tiles)."""
    heads, head_dim, tokens = 12, 64, 1500
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(heads, tokens, head_dim, device="cuda", generator=gen).to(dtype) for _ in range(2))
    kwargs = dict(scale=head_dim**-0.5, sink_size=4, local_window=8, recent_ratio=0.1)
    got = ops.head_statistics(q, k, 0, backend="triton", **kwargs)
    want = ops.head_statistics(q.float(), k.float(), 0, backend="torch", **kwargs)
    count = float(want["count"][0])
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4 * count, rtol=1e-4, msg=key)


def test_decode_statistics_long_context():
    heads, head_dim, context = 32, 80, 8192
    sink, window, _ = seed_mix_profile(1, heads, head_dim).layer_tensors(0, device="cuda")
    kept = torch.minimum(torch.tensor(context, device="cuda"), sink + window)[None].contiguous()
    base = (torch.cumsum(kept.flatten(), 0) - kept.flatten()).view(1, heads)
    rows = int(kept.sum())
    k_pool, v_pool = (torch.randn(rows, head_dim, device="cuda", dtype=torch.float16) for _ in range(2))
    # each head's rows hold its kept positions: sinks 0..S-1, then the last W positions (order does not matter)
    pos_pool = torch.cat([torch.cat([torch.arange(int(min(s, context)), device="cuda"),
                                     torch.arange(context - int(n) + int(min(s, context)), context, device="cuda")])
                          for s, n in zip(sink.tolist(), kept[0].tolist())])
    q = torch.randn(1, heads, head_dim, device="cuda", dtype=torch.float16)
    query_position = torch.tensor([context - 1], device="cuda")
    kwargs = dict(scale=head_dim**-0.5, return_stats=True, pos_pool=pos_pool, query_position=query_position)
    _, got = ops.decode_attention(q, k_pool, v_pool, base, kept, backend="triton", **kwargs)
    want_out, want = ops.decode_attention_reference(q, k_pool, v_pool, base, kept, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    # the one-launch variant, with 128 chunks per full head merged by whichever arrives last: repeated, so that
    # an ordering fault between a chunk's partial stores and its arrival would show
    decode = triton_module("decode")
    stats = (pos_pool, query_position, 4, 8)
    for _ in range(50):
        out, got = decode.decode_attention(q, k_pool, v_pool, base, kept, head_dim**-0.5, fused=True, chunk=64,
                                           stats=stats)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
        assert not decode.arrival_counters(q.device, heads).any()
