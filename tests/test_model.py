"""The patched GPTNeoX against the dense per-head-masked reference (SPEC 2) and the unpatched model."""

import os

import pytest
import torch
from reference_model import positions_from_mask, reference_attention, reference_logits, tiny_model, wrap_forward

import headkv_engine as hk
from headkv_engine.profile import HeadPolicy

BACKENDS = ["torch", "cpu", "triton", "metal"]


@pytest.fixture(autouse=True)
def _backend_available(request):
    """Triton is an optional extra: its tests skip where it is not installed, except in CI."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend == "triton" and os.environ.get("CI") != "true":
        pytest.importorskip("triton")
LAYERS, HEADS, HEAD_DIM = 2, 4, 16


def mixed_profile(fill=False):
    """Every strategy and edge case at once: window 1, sink 0, a window longer than the sequence, prune."""
    heads = {
        (0, 0): HeadPolicy.make("sink_window", 2, 3),
        (0, 1): HeadPolicy.make("window_only", None, 1),
        (0, 2): HeadPolicy.make("sink_window", 4, 100),
        (1, 0): HeadPolicy.make("sink_window", 0, 5),
        (1, 1): HeadPolicy.make("sink_window", 3, 5),
        (1, 2): HeadPolicy.make("prune", fill=[0.5] * HEAD_DIM if fill else None),
        (1, 3): HeadPolicy.make("window_only", None, 7),
    }
    return hk.Profile(LAYERS, HEADS, HEAD_DIM, heads=heads)


@pytest.fixture(scope="module")
def model():
    return tiny_model(LAYERS, HEADS, HEAD_DIM)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))


def stepwise_logits(model, ids, first, step=1, mask=None):
    """Prefill `first` tokens, then feed the rest `step` tokens at a time through the cache."""
    out = model(ids[:, :first], attention_mask=None if mask is None else mask[:, :first], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for start in range(first, ids.shape[1], step):
        stop = min(start + step, ids.shape[1])
        m = None if mask is None else mask[:, :stop]
        out = model(ids[:, start:stop], attention_mask=m, cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def test_reference_differs_from_dense(model, ids):
    """The profile really changes the model, so agreement below is not trivial."""
    assert (reference_logits(model, mixed_profile(), ids) - model(ids).logits).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_profile_equals_unpatched(model, ids, backend):
    dense = model(ids).logits
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend=backend):
        patched, _ = stepwise_logits(model, ids, first=9)
    torch.testing.assert_close(patched, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "first,step", [(21, 1), (1, 1), (9, 1), (4, 5)], ids=["prefill", "decode", "prefill+decode", "chunks"]
)
def test_patched_equals_masked_reference(model, ids, backend, first, step):
    profile = mixed_profile(fill=True)
    ref = reference_logits(model, profile, ids)
    with hk.patch_model(model, profile, backend=backend):
        got, _ = stepwise_logits(model, ids, first=first, step=step)
    assert (got - ref).abs().max() <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_mode_equals_its_reference(model, ids, backend):
    profile = mixed_profile()
    ref = reference_logits(model, profile, ids, mode="shifted")
    assert (ref - reference_logits(model, profile, ids)).abs().max() > 1e-2  # the modes do differ
    with hk.patch_model(model, profile, backend=backend, position_mode="shifted"):
        prefill = model(ids).logits
        stepped, _ = stepwise_logits(model, ids, first=6)
    assert (prefill - ref).abs().max() <= 1e-3
    assert (stepped - ref).abs().max() <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_equals_each_sequence_alone(model, backend):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (3, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    profile = mixed_profile()
    ref = reference_logits(model, profile, ids, mask)
    with hk.patch_model(model, profile, backend=backend):
        got, cache = stepwise_logits(model, ids, first=12, mask=mask)
        alone = [model(ids[b : b + 1, mask[b].bool()]).logits[0] for b in range(3)]
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-3
    for b in range(3):
        assert (got[b, real[b]] - alone[b]).abs().max() <= 1e-3
    # Padding is never stored: a full head of sequence b keeps exactly its real tokens.
    assert cache.kept_tokens(0)[:, 3].tolist() == real.sum(1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_greedy_matches_reference(model, backend):
    prompt = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    profile = mixed_profile()
    with hk.patch_model(model, profile, backend=backend):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True)
    assert isinstance(out.past_key_values, hk.HeadKVCache)
    expected = prompt
    for _ in range(12):
        logits = reference_logits(model, profile, expected)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, expected)


def reference_generate(model, profile, prompt, **kwargs):
    """generate() with the dense per-head-masked reference attention, recomputing whole sequences (no cache)."""
    with reference_attention(model, profile, None) as ctx:
        original = model.gpt_neox.forward

        def forward_with_positions(input_ids=None, attention_mask=None, **kw):
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            ctx["positions"] = positions_from_mask(mask)
            kw["position_ids"] = ctx["positions"].clamp(min=0).to(input_ids.device)
            return original(input_ids=input_ids, attention_mask=attention_mask, **kw)

        model.gpt_neox.forward = forward_with_positions
        try:
            return model.generate(prompt, use_cache=False, **kwargs)
        finally:
            del model.gpt_neox.forward


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_sampling_with_seed_matches_reference(model, backend):
    prompt = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    profile = mixed_profile()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0, temperature=1.0)
    with hk.patch_model(model, profile, backend=backend):
        torch.manual_seed(123)
        got = model.generate(prompt, **kwargs)
    torch.manual_seed(123)
    expected = reference_generate(model, profile, prompt, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_matches_reference(model, backend):
    """Beam search reorders the ragged cache every step (rows of one beam copied to several): the beams, their
    scores and the returned sequences equal beam search over the reference attention."""
    prompt = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(11))
    profile = mixed_profile()
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, num_beams=3, num_return_sequences=2,
                  do_sample=False, return_dict_in_generate=True, output_scores=True)
    with hk.patch_model(model, profile, backend=backend):
        got = model.generate(prompt, **kwargs)
    assert isinstance(got.past_key_values, hk.HeadKVCache)
    expected = reference_generate(model, profile, prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reordered_cache_continues_like_a_cache_of_the_reordered_batch(model, backend):
    """reorder_cache / batch_select_indices / batch_repeat_interleave equal prefilling the rearranged batch."""
    ids = torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(12))
    nxt = torch.randint(1, 97, (3, 1), generator=torch.Generator().manual_seed(13))
    with hk.patch_model(model, mixed_profile(), backend=backend):
        for rearrange, index in (
            (lambda c: c.reorder_cache(torch.tensor([2, 0, 0])), [2, 0, 0]),
            (lambda c: c.batch_select_indices(torch.tensor([False, True, True])), [1, 2]),
            (lambda c: c.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
        ):
            cache = model(ids[:, :11], use_cache=True).past_key_values
            model(ids[:, 11:], cache=cache, use_cache=True)  # a decode step: rings have wrapped, capacities grown
            rearrange(cache)
            fresh = model(ids[index], use_cache=True).past_key_values
            for layer in range(LAYERS):
                assert torch.equal(cache.kept_tokens(layer), fresh.kept_tokens(layer))
            step = nxt[index]
            got = model(step, cache=cache, use_cache=True).logits
            want = model(step, cache=fresh, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sequence index"):
        cache.reorder_cache(torch.tensor([7]))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_generate_continues_from_its_returned_cache(model, backend):
    """A second generate() over the returned cache (a multi-turn chat) feeds only the new tokens: it equals one
    generate() of the whole length, and the cache holds each token once."""
    prompt = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(21))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kwargs = dict(do_sample=False, pad_token_id=0)
    profile = mixed_profile()
    with hk.patch_model(model, profile, backend=backend):
        whole = model.generate(prompt, attention_mask=mask, max_new_tokens=8, **kwargs)
        first = model.generate(prompt, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True,
                               **kwargs)
        cache = first.past_key_values
        assert cache.is_linear == [False] * LAYERS and not cache.is_croppable and cache.batch_size == 2
        longer_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
        second = model.generate(first.sequences, attention_mask=longer_mask, cache=cache, max_new_tokens=4,
                                **kwargs)
    assert torch.equal(second, whole)
    assert cache.get_seq_length() == whole.shape[1] - 1  # the last token was sampled, never fed
    real = longer_mask.sum(1) + 3
    assert torch.equal(cache.kept_tokens(0)[:, 3], real)  # a full head holds every real token once
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(3)


def test_failed_forward_leaves_a_refused_cache(model, ids):
    """A forward that fails half-way (an out-of-memory in layer 1, say) leaves layer 0 holding the block and
    layer 1 not; using that cache again raises rather than silently attending over the mismatch."""
    with hk.patch_model(model, mixed_profile(), backend="torch"):
        cache = model(ids[:, :8], use_cache=True).past_key_values
        mlp = model.gpt_neox.layers[1].mlp

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("simulated")

        mlp.forward = out_of_memory
        try:
            with pytest.raises(torch.OutOfMemoryError):
                model(ids[:, 8:10], cache=cache, use_cache=True)
        finally:
            del mlp.forward
        with pytest.raises(RuntimeError, match="left incomplete.*OutOfMemoryError"):
            model(ids[:, 8:10], cache=cache, use_cache=True)
        # a block the cache refuses before any layer runs leaves it usable
        fresh = model(ids[:, :8], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="cover the new tokens"):
            model(ids[:, 8:10], attention_mask=torch.tensor([[1], [1]]), cache=fresh, use_cache=True)
        assert fresh.get_seq_length() == 8
        model(ids[:, 8:10], cache=fresh, use_cache=True)


def test_left_padded_generate_equals_alone(model):
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with hk.patch_model(model, mixed_profile(), backend="torch"):
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = model.generate(ids[1:, 4:], attention_mask=mask[1:, 4:], max_new_tokens=6, do_sample=False)
    assert torch.equal(batch[1, 4:], alone[0])


def test_unpatch_restores_exactly(model, ids):
    before = model(ids).logits
    forward = type(model.gpt_neox).forward
    handle = hk.patch_model(model, mixed_profile(), backend="torch")
    assert not torch.allclose(model(ids).logits, before)
    hk.unpatch_model(model)
    assert not handle.active
    assert torch.equal(model(ids).logits, before)
    assert "forward" not in vars(model.gpt_neox) and type(model.gpt_neox).forward is forward
    with pytest.raises(ValueError, match="not patched"):
        hk.unpatch_model(model)


def test_context_manager_and_double_patch(model, ids):
    before = model(ids).logits
    with hk.patch_model(model, mixed_profile(), backend="torch") as handle:
        assert isinstance(handle, hk.PatchHandle)
        with pytest.raises(RuntimeError, match="already patched"):
            hk.patch_model(model, mixed_profile())
    assert torch.equal(model(ids).logits, before)


def test_patching_the_inner_model_counts_as_patched(model, ids):
    """A GPTNeoXForCausalLM whose GPTNeoXModel is patched on its own is patched: a second patch is refused and
    unpatch_model on either restores it."""
    before = model(ids).logits
    for unpatch_target in (model, model.gpt_neox):
        handle = hk.patch_model(model.gpt_neox, mixed_profile(), backend="torch")
        with pytest.raises(RuntimeError, match="already patched"):
            hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch")
        hk.unpatch_model(unpatch_target)
        assert not handle.active
        assert torch.equal(model(ids).logits, before)


def test_unpatch_restores_instance_forwards(model, ids):
    """A forward set on the instance before patching (accelerate's hooks, a user's wrapper) is put back."""
    attention = model.gpt_neox.layers[0].attention
    calls = wrap_forward(attention)
    wrapped = attention.forward
    try:
        with hk.patch_model(model, mixed_profile(), backend="torch"):
            model(ids)
        calls.clear()
        model(ids)
        assert calls == [1] and attention.forward is wrapped
    finally:
        del attention.forward


def test_accelerate_style_hooks_keep_running_while_patched(model, ids):
    """accelerate (device_map, offloading) wraps `forward` in a hook that calls `module._old_forward`; patching
    replaces `_old_forward`, so the hooks still move inputs while the profile runs, and unpatching restores both."""
    import functools  # noqa: PLC0415

    seen = []

    class Hook:  # what accelerate.hooks.add_hook_to_module installs, reduced to its calling convention
        def pre_forward(self, module, *args, **kwargs):
            seen.append(type(module).__name__)
            return args, kwargs

    def hooked_forward(module, *args, **kwargs):
        args, kwargs = module._hf_hook.pre_forward(module, *args, **kwargs)
        return module._old_forward(*args, **kwargs)

    profile = mixed_profile()
    want = reference_logits(model, profile, ids)  # (the reference sets and deletes instance forwards itself)
    modules = [model.gpt_neox, model.gpt_neox.layers[1].attention]
    for module in modules:
        module._hf_hook, module._old_forward = Hook(), module.forward
        module.forward = functools.partial(hooked_forward, module)
    try:
        before = model(ids).logits
        seen.clear()
        with hk.patch_model(model, profile, backend="torch"):
            patched = model(ids).logits
        assert seen == ["GPTNeoXModel", "GPTNeoXAttention"]
        torch.testing.assert_close(patched, want, atol=1e-3, rtol=0)
        assert all(isinstance(m.forward, functools.partial) for m in modules)
        assert torch.equal(model(ids).logits, before)
    finally:
        for module in modules:
            del module.forward, module._old_forward, module._hf_hook


def test_return_dict_false_gives_the_unpatched_tuple_layout(model, ids):
    want = model.gpt_neox(ids, return_dict=False, use_cache=False)
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        got = model.gpt_neox(ids, return_dict=False, use_cache=False)
        assert isinstance(got, tuple) and len(got) == len(want)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
        logits = model(ids, return_dict=False)[0]
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=0)


def test_shifted_mode_refuses_a_length_dependent_rope():
    config_model = tiny_model(LAYERS, HEADS, HEAD_DIM)
    config_model.gpt_neox.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="rope_type is 'dynamic'"):
        hk.patch_model(config_model, hk.Profile.full(LAYERS, HEADS), position_mode="shifted")
    hk.patch_model(config_model, hk.Profile.full(LAYERS, HEADS), position_mode="absolute").unpatch()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_training_gradients_equal_the_reference(backend, ids):
    """Outside torch.no_grad the kernels (no backward) give way to the torch reference, with one warning, so the
    gradients are those of the dense masked reference, not silently missing."""
    model = tiny_model(LAYERS, HEADS, HEAD_DIM).requires_grad_(True)  # (tiny_model's parameters do not)
    profile = mixed_profile()
    reference_logits.__wrapped__(model, profile, ids).logsumexp(-1).mean().backward()  # (without its no_grad)
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with hk.patch_model(model, profile, backend=backend):
        if backend == "cpu":
            with pytest.warns(UserWarning, match="torch reference instead of backend 'cpu'"):
                model(ids).logits.logsumexp(-1).mean().backward()
        else:
            model(ids).logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_patched_model_equals_eager(model, ids):
    """torch.compile traces around the kernels (raw data pointers), which run eagerly."""
    profile = mixed_profile()
    with hk.patch_model(model, profile, backend="cpu"), torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="eager")
        for _ in range(2):
            torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-5, rtol=0)


def test_patched_model_deep_copies_into_an_independent_patched_model(ids):
    import copy  # noqa: PLC0415

    model = tiny_model(LAYERS, HEADS, HEAD_DIM)
    before = model(ids).logits
    with hk.patch_model(model, mixed_profile(), backend="torch"):
        patched = model(ids).logits
        twin = copy.deepcopy(model)
    assert torch.equal(model(ids).logits, before)
    torch.testing.assert_close(twin(ids).logits, patched, atol=1e-6, rtol=0)  # the copy is still patched
    hk.unpatch_model(twin)
    assert torch.equal(twin(ids).logits, before)


def test_what_a_patched_model_cannot_do_is_refused(ids):
    model = tiny_model(LAYERS, HEADS, HEAD_DIM)
    handle = hk.patch_model(model, mixed_profile(), backend="torch")
    model.train()
    model.activation_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(ids, use_cache=False)
    model.activation_checkpointing_disable()
    model.config.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        model(ids)
    model.eval()
    model(ids)  # evaluation applies no dropout anyway
    model.config.attention_dropout = 0.0
    cache = model(ids[:, :8], use_cache=True).past_key_values
    handle.unpatch()
    with pytest.raises(RuntimeError, match="this patch was undone"):
        with handle:
            pass
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        with pytest.raises(ValueError, match="built for another profile"):
            model(ids[:, 8:], cache=cache)
    with hk.patch_model(model, mixed_profile(), backend="torch"):  # an equal profile, another object: fine
        model(ids[:, 8:], cache=cache)


def test_gpt_neox_model_without_head(model, ids):
    base = model.gpt_neox
    dense = base(ids).last_hidden_state
    with hk.patch_model(base, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        out = base(ids, use_cache=True)
    assert isinstance(out.past_key_values, hk.HeadKVCache)
    torch.testing.assert_close(out.last_hidden_state, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_tokens_and_nbytes(model, backend):
    profile = mixed_profile()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(6))
    with hk.patch_model(model, profile, backend=backend):
        out = model(ids[:, :12], use_cache=True)
        cache = out.past_key_values
        expected = profile.kept_tokens(12)
        for layer in range(LAYERS):
            assert torch.equal(cache.kept_tokens(layer), expected[layer].expand(2, HEADS))
        # Right after a prefill every head owns exactly what it keeps.
        itemsize = torch.finfo(torch.float32).bits // 8
        assert cache.nbytes() == 2 * itemsize * HEAD_DIM * 2 * int(expected.sum())
        for t in range(12, 30):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
        expected = profile.kept_tokens(30)
        for layer in range(LAYERS):
            assert torch.equal(cache.kept_tokens(layer), expected[layer].expand(2, HEADS))
        # Capacity covers what a head keeps, with at most an eighth (or 16 rows) spare, and never exceeds S + W.
        for layer, store in enumerate(cache.stores):
            cap = store.capacity
            for h in range(HEADS):
                policy = profile.policy(layer, h)
                kept = policy.kept_tokens(30)
                assert (cap[:, h] >= kept).all() and (cap[:, h] <= kept + max(kept // 8, 16)).all()
                if policy.strategy != "full":
                    assert (cap[:, h] <= policy.sink_size + policy.window_size).all()
            assert store.nbytes() == 2 * itemsize * HEAD_DIM * int(cap.sum())
        # the rows written: the tokens kept, without the room for growth
        assert cache.kept_nbytes() == 2 * itemsize * HEAD_DIM * 2 * int(expected.sum()) < cache.nbytes()
    dense_bytes = 2 * LAYERS * HEADS * 30 * HEAD_DIM * itemsize * 2
    assert cache.nbytes() < dense_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_tolerance(dtype, backend, ids):
    model = tiny_model(LAYERS, HEADS, HEAD_DIM, dtype=dtype)
    profile = mixed_profile()
    ref = reference_logits(model.float(), profile, ids)
    model.to(dtype)
    with hk.patch_model(model, profile, backend=backend):
        got, _ = stepwise_logits(model, ids, first=8)
    span = (ref.max() - ref.min()).item()
    assert (got.float() - ref).abs().max().item() <= 5e-2 * span


def test_profile_mismatch_refused(model):
    with pytest.raises(hk.ProfileError, match="num_heads"):
        hk.patch_model(model, hk.Profile.full(LAYERS, HEADS + 1))
    with pytest.raises(hk.ProfileError, match="head_dim"):
        hk.patch_model(model, hk.Profile.full(LAYERS, HEADS, head_dim=HEAD_DIM + 1))
    with pytest.raises(ValueError, match="position_mode"):
        hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), position_mode="relative")
    with pytest.raises(ValueError, match="backend"):
        hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="cuda")


def test_an_empty_cache_of_another_kind_is_replaced_with_a_warning(model, ids):
    from transformers import StaticCache  # noqa: PLC0415

    static = StaticCache(config=model.config, max_cache_len=32)
    with hk.patch_model(model, mixed_profile(), backend="torch"):
        with pytest.warns(UserWarning, match="the StaticCache passed .* is not used"):
            out = model(ids[:, :5], cache=static, use_cache=True)
    assert isinstance(out.past_key_values, hk.HeadKVCache)


def test_foreign_filled_cache_refused(model, ids):
    dense_cache = model(ids, use_cache=True).past_key_values
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        with pytest.raises(ValueError, match="HeadKVCache"):
            model(ids[:, :1], cache=dense_cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_dense_cache_continues_like_the_reference(model, backend):
    """Compressing a dense prefix equals prefilling under the profile when layer 0 keeps everything
    (then every layer's keys and values are the same in both)."""
    profile = hk.Profile(LAYERS, HEADS, HEAD_DIM, heads={
        (1, 0): HeadPolicy.make("sink_window", 2, 3),
        (1, 1): HeadPolicy.make("window_only", None, 1),
        (1, 2): HeadPolicy.make("prune"),
    })
    ids = torch.randint(1, 97, (2, 21), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = reference_logits(model, profile, ids, mask)
    positions = positions_from_mask(mask)
    dense = model(ids[:, :15], attention_mask=mask[:, :15], position_ids=positions[:, :15].clamp(min=0),
                  use_cache=True).past_key_values
    cache = hk.HeadKVCache.from_dense(profile, dense, attention_mask=mask[:, :15], backend=backend)
    assert torch.equal(cache.kept_tokens(1)[:, :3], torch.tensor([[5, 1, 0], [5, 1, 0]]))
    with hk.patch_model(model, profile, backend=backend):
        got = model(ids[:, 15:], attention_mask=mask, cache=cache, use_cache=True).logits
    real = mask[:, 15:].bool()
    assert (got - ref[:, 15:])[real].abs().max() <= 1e-3


def test_use_cache_false_with_a_cache_passed_fills_and_returns_it_like_the_unpatched_model(model, ids):
    """transformers' GPTNeoX fills a cache it is given and returns it whatever use_cache says; without one and
    use_cache=False it returns none."""
    from transformers import DynamicCache  # noqa: PLC0415

    dense = DynamicCache()
    unpatched = model(ids[:, :6], cache=dense, use_cache=False)
    assert unpatched.past_key_values is dense and dense.get_seq_length() == 6
    assert model(ids[:, :6], use_cache=False).past_key_values is None
    with hk.patch_model(model, mixed_profile(), backend="torch"):
        cache = model(ids[:, :6], use_cache=True).past_key_values
        out = model(ids[:, 6:9], cache=cache, use_cache=False)
        assert out.past_key_values is cache and cache.get_seq_length() == 9
        assert isinstance(model(ids[:, :6], cache=DynamicCache(), use_cache=False).past_key_values, hk.HeadKVCache)
        assert model(ids[:, :6], use_cache=False).past_key_values is None
        assert model(ids[:, 9:12], cache=cache, use_cache=False, return_dict=False)[1] is cache
        continued = model(ids[:, 12:], cache=cache, use_cache=True).logits
    ref = reference_logits(model, mixed_profile(), ids)
    torch.testing.assert_close(continued, ref[:, 12:], atol=1e-3, rtol=0)


def test_float64_model_runs_on_the_torch_backend_and_kernel_backends_refuse_it(ids):
    model = tiny_model(LAYERS, HEADS, HEAD_DIM, dtype=torch.float64)
    dense = model(ids).logits
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        patched, _ = stepwise_logits(model, ids, first=9)
    assert patched.dtype == torch.float64
    torch.testing.assert_close(patched, dense, atol=1e-10, rtol=0)  # fp64 attention, not fp32
    profile = mixed_profile(fill=True)
    with hk.patch_model(model, profile, backend="torch"):
        patched, _ = stepwise_logits(model, ids, first=9)
    assert (patched - reference_logits(model, profile, ids)).abs().max() <= 1e-6  # the reference model attends in fp32
    for backend in ("cpu", "triton", "metal"):
        with hk.patch_model(model, profile, backend=backend), pytest.raises(TypeError, match="backend='torch'"):
            model(ids)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_shifted_mode_keeps_float32_precision_at_large_positions(model, backend):
    """Shifted window heads score keys by their distance to the query: a stream 10^7 tokens in gives what it
    gives at its start (a float32 angle at 10^7 is off by up to half a radian)."""
    profile = hk.Profile.window_only(LAYERS, HEADS, window_size=24, head_dim=HEAD_DIM)
    profile.heads = {(0, 0): HeadPolicy.make("window_only", None, 5), (1, 1): HeadPolicy.make("window_only", None, 3)}
    ids = torch.randint(0, 97, (2, 34), generator=torch.Generator().manual_seed(1))
    full_rotary = tiny_model(LAYERS, HEADS, HEAD_DIM, rotary_pct=1.0)

    def logits_from(offset, m):
        with hk.patch_model(m, profile, backend=backend, position_mode="shifted"):
            cache = hk.HeadKVCache(profile, position_mode="shifted")
            # as if `offset` tokens had gone by: the first block (longer than every window) fills every kept
            # row, so only the rotations see the offset (no head keeps sinks, which would hold positions < 4)
            cache.seen = torch.full((2,), offset)
            out = [m(ids[:, :25], cache=cache, use_cache=True).logits]
            out += [m(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(25, 34)]
        return torch.cat(out, dim=1)

    for m in (model, full_rotary):
        start = logits_from(0, m)
        for offset in (10**5, 10**7):
            torch.testing.assert_close(logits_from(offset, m), start, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_right_padded_batch_equals_the_unpatched_model_on_its_real_tokens(model, ids, backend):
    """A right-padded batch (a tokenizer's default padding side, as when scoring texts) gives every real token
    the logits of the unpatched model, and of the masked reference under a profile."""
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    mask[1, 9:] = 0
    real = mask.bool()
    dense = model(ids, attention_mask=mask).logits
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend=backend):
        out = model(ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
    assert (out.logits - dense)[real].abs().max() <= 1e-4
    assert torch.equal(out.past_key_values.kept_tokens(0), torch.tensor([[15] * HEADS, [9] * HEADS]))
    want_hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for got, want in zip(out.hidden_states, want_hidden, strict=True):
        assert (got - want)[real].abs().max() <= 1e-4
    profile = mixed_profile(fill=True)
    with hk.patch_model(model, profile, backend=backend):
        got = model(ids, attention_mask=mask).logits
    assert (got - reference_logits(model, profile, ids, mask))[real].abs().max() <= 1e-3


def test_a_mask_that_hides_a_stored_token_is_refused(model, ids):
    """A token once in the cache stays visible; a later mask that marks it as padding (the unpatched model would
    hide it) is refused, and the cache continues with the mask as it was."""
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as given
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        cache = model(ids[:, :10], attention_mask=mask[:, :10], use_cache=True).past_key_values
        hidden = mask.clone()
        hidden[0, 4] = 0
        with pytest.raises(ValueError, match=r"attention_mask: its columns of the 10 tokens already in the cache give "
                                             r"sequence 0 9 real tokens, the cache stored 10"):
            model(ids[:, 10:11], attention_mask=hidden[:, :11], cache=cache, use_cache=True)
        got = model(ids[:, 10:12], attention_mask=mask, cache=cache, use_cache=True).logits
    want = model(ids[:, :12], attention_mask=mask).logits[:, 10:]
    assert (got - want).abs().max() <= 1e-4


def test_a_full_width_mask_of_another_batch_size_is_a_clear_error(model, ids):
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        cache = model(ids[:, :7], use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"attention_mask must cover the new tokens: expected \(2, 1\)"):
            model(ids[:, 7:8], attention_mask=torch.ones(1, 8, dtype=torch.long), cache=cache, use_cache=True)


def test_a_float_mask_is_read_as_transformers_reads_it(model, ids):
    """Any nonzero mask value is a real token (a float mask of 0.5 is not truncated to padding)."""
    mask = torch.ones(ids.shape)
    mask[0, :4] = 0.0
    mask[1, 3:] = 0.5
    dense = model(ids, attention_mask=mask).logits
    real = mask != 0
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend="torch"):
        out = model(ids, attention_mask=mask, use_cache=True)
    assert (out.logits - dense)[real].abs().max() <= 1e-4
    assert torch.equal(out.past_key_values.kept_tokens(0)[:, 0], real.sum(1))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_later_turn_padded_after_real_tokens_continues_like_the_unpatched_model(model, backend):
    """Multi-turn over one cache: a left-padded first turn generated, then a new turn whose block has padding
    after (and between) real tokens, then more tokens: every real token's logits equal one unpatched pass over
    the whole masked batch."""
    prompt = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    turn = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    turn_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    more = torch.randint(1, 97, (2, 3), generator=torch.Generator().manual_seed(5))
    with hk.patch_model(model, hk.Profile.full(LAYERS, HEADS), backend=backend):
        first = model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True)
        cache, sequences = first.past_key_values, first.sequences
        mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
        # the cache holds all but the last generated token: the new block starts with it
        fed = sequences.shape[1] - 1
        ids = torch.cat([sequences, turn, more], dim=1)
        mask = torch.cat([mask, turn_mask, torch.ones_like(more)], dim=1)
        second = model(ids[:, fed:-3], attention_mask=mask[:, :-3], cache=cache, use_cache=True).logits
        third = model(ids[:, -3:], attention_mask=mask, cache=cache, use_cache=True).logits
    dense = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask).clamp(min=0)).logits
    got = torch.cat([second, third], dim=1)
    real = mask[:, fed:].bool()
    assert (got - dense[:, fed:])[real].abs().max() <= 1e-4
    assert torch.equal(cache.kept_tokens(0)[:, 0], mask.sum(1))


def test_from_dense_refuses_padding_after_real_tokens_naming_the_row_and_column(model, ids):
    mask = torch.ones_like(ids[:, :6])
    mask[1, 4:] = 0
    dense = model(ids[:, :6], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="attention_mask: .*left padding.*row 1 has padding at column 4"):
        hk.HeadKVCache.from_dense(mixed_profile(), dense, attention_mask=mask)
