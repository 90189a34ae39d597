"""A dense reference for a GPTNeoX under a profile, written from SPEC section 2 with plain loops.

`reference_logits(model, profile, ids, mask, position_mode)` runs the *unpatched* model on whole sequences
(no cache) with every attention module replaced by a loop that, for each query t of each head, lists the
kept keys of the SPEC table, gives each key the position it has under the mode (absolute: its position;
shifted: its rank in the kept set, the query taking the next rank) and applies rotary and softmax to it.
"""

from __future__ import annotations

import contextlib
import types

import torch

from headkv_engine.quickstart import random_gpt_neox


def tiny_model(layers=2, heads=4, head_dim=16, vocab=97, seed=0, dtype=torch.float32, rotary_pct=0.25):
    """A random GPTNeoX with large init so heads attend sharply and differently. Its parameters require no grad,
    so that forwards outside torch.no_grad still run the backend under test (autograd would make the cache use the
    torch reference); a training test turns them back on."""
    model = random_gpt_neox(layers, heads, head_dim, vocab, seed, max_positions=512, rotary_pct=rotary_pct,
                            initializer_range=0.15, dtype=dtype)
    return model.requires_grad_(False)


def wrap_forward(module) -> list:
    """Set a wrapper as `module`'s instance forward (as a hook or a user would); returns the list it appends to
    on every call. The caller deletes `module.forward` when done."""
    calls = []
    original = module.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.forward = wrapped
    return calls


def kept_keys(policy, t):
    """Positions head `policy` holds when the query is at position t (SPEC 2 table)."""
    if policy.strategy == "prune":
        return []
    if policy.strategy == "full":
        return list(range(t + 1))
    window = range(max(0, t - policy.window_size + 1), t + 1)
    sinks = [j for j in range(min(policy.sink_size, t + 1)) if j not in window]
    return sinks + list(window)


def _rotate(x, cos, sin):
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = d // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def _reference_attention(self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None, **kw):
    ctx = self._ref_ctx
    batch, tokens = hidden_states.shape[:2]
    qkv = self.query_key_value(hidden_states).view(batch, tokens, -1, 3 * self.head_size).transpose(1, 2)
    query, key, value = (x.float() for x in qkv.chunk(3, dim=-1))
    heads = query.shape[1]
    cos_table, sin_table = ctx["rotary"](hidden_states, torch.arange(tokens + 1, device=hidden_states.device)[None])
    cos_table, sin_table = cos_table[0].float(), sin_table[0].float()
    out = torch.zeros(batch, heads, tokens, self.head_size, device=hidden_states.device)
    for b in range(batch):
        col_of = {int(p): c for c, p in enumerate(ctx["positions"][b]) if p >= 0}
        for h in range(heads):
            policy = ctx["profile"].policy(self.layer_idx, h)
            for c, t in enumerate(ctx["positions"][b].tolist()):
                if t < 0:
                    continue
                keys = kept_keys(policy, t)
                if not keys:
                    out[b, h, c] = torch.tensor(policy.fill, device=out.device) if policy.fill else 0.0
                    continue
                ranks = list(range(len(keys))) if ctx["mode"] == "shifted" else keys
                q_pos = len(keys) - 1 if ctx["mode"] == "shifted" else t
                q = _rotate(query[b, h, col_of[t]], cos_table[q_pos], sin_table[q_pos])
                cols = [col_of[j] for j in keys]
                k = _rotate(key[b, h, cols], cos_table[ranks], sin_table[ranks])
                probs = torch.softmax(k @ q * self.scaling, dim=0)
                out[b, h, c] = probs @ value[b, h, cols]
    out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch, tokens, -1)
    return self.dense(out), None


def positions_from_mask(mask):
    return torch.where(mask.bool(), mask.long().cumsum(1) - 1, torch.full_like(mask.long(), -1)).cpu()


@contextlib.contextmanager
def reference_attention(model, profile, positions, mode="absolute"):
    ctx = {"profile": profile, "positions": positions, "mode": mode, "rotary": model.gpt_neox.rotary_emb}
    attentions = [layer.attention for layer in model.gpt_neox.layers]
    for att in attentions:
        att._ref_ctx = ctx
        att.forward = types.MethodType(_reference_attention, att)
    try:
        yield ctx
    finally:
        for att in attentions:
            del att.forward, att._ref_ctx


@torch.no_grad()
def reference_logits(model, profile, ids, mask=None, mode="absolute"):
    mask = torch.ones_like(ids) if mask is None else mask
    positions = positions_from_mask(mask)
    with reference_attention(model, profile, positions, mode):
        return model(
            ids, attention_mask=mask, position_ids=positions.clamp(min=0).to(ids.device), use_cache=False
        ).logits
