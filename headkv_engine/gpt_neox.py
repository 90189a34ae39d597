"""GPTNeoX (Pythia) under a profile: the forwards that `patch_model` installs on the model's instances.

`model_forward` replaces `GPTNeoXModel.forward` (transformers 5.x, modeling_gpt_neox.py): same embedding,
rotary and layer loop, but positions count each sequence's real tokens, no dense [T, T] mask is built, and
the cache is a `HeadKVCache`. `attention_forward` replaces `GPTNeoXAttention.forward`: the same projections
and rotary embedding, then the ragged ops instead of `ALL_ATTENTION_FUNCTIONS`.
"""

from __future__ import annotations

import warnings

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb, rotate_half

from headkv_engine.cache import HeadKVCache, padding_after_real


def base_model(model):
    """The GPTNeoXModel inside a GPTNeoXForCausalLM (or the model itself)."""
    return getattr(model, "gpt_neox", model)


def attention_modules(model):
    return [layer.attention for layer in base_model(model).layers]


def rotate(x, cos, sin):
    """Rotary embedding of the first cos.shape[-1] dims of x (GPTNeoX's partial rotary); cos/sin like x."""
    rotary_dims = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dims], x[..., rotary_dims:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def reorder_columns(x, order):
    """x [B, T, ...] with row b's columns taken in the order order[b] ([B, T])."""
    return x.gather(1, order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x))


def rotary_float64_angles(handle, rotary, x, positions):
    """cos, sin as `rotary(x, positions)` gives them, with the angles position * frequency computed in float64
    on the host (where `positions` are; some devices have no float64); `handle` keeps the host copy of the
    frequencies, so a step reads nothing back from the device.

    Shifted mode rotates window keys and queries at their absolute positions, whose scores depend only on the
    difference: a float32 angle at position 1e7 is off by up to half a radian (its rounding step is 1), float64
    angles keep cos/sin exact to float32 at any position, as a rank-rotated cache would be."""
    key = (rotary.inv_freq.data_ptr(), rotary.inv_freq._version, rotary.inv_freq.dtype)
    if handle._host_inv_freq is None or handle._host_inv_freq[0] != key:
        handle._host_inv_freq = (key, rotary.inv_freq.detach().to("cpu", torch.float64))
    inv_freq = handle._host_inv_freq[1]
    freqs = positions.to("cpu", torch.float64)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    scaling = rotary.attention_scaling
    cos, sin = (torch.stack((emb.cos(), emb.sin())) * scaling).to(x.device, x.dtype)  # one copy to the device
    return cos, sin


def model_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    inputs_embeds=None,
    cache=None,
    use_cache=None,
    output_hidden_states=None,
    output_attentions=None,
    past_key_values=None,
    **kwargs,
):
    handle = self._headkv_patch
    # as transformers' output capturing does: an explicit return_dict, else the config's
    return_dict = kwargs.pop("return_dict", None)
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if output_attentions:
        raise NotImplementedError("a patched model does not return attention weights (output_attentions=True)")
    if self.training and getattr(self, "gradient_checkpointing", False):
        raise NotImplementedError("a patched model does not support gradient checkpointing (a recomputed layer would "
                                  "store its tokens twice): call model.activation_checkpointing_disable() or unpatch")
    if self.training and getattr(self.config, "attention_dropout", 0.0) > 0:
        raise NotImplementedError(f"a patched model applies no attention dropout (the config has "
                                  f"{self.config.attention_dropout}): call model.eval() or set attention_dropout=0")
    cache = cache if cache is not None else past_key_values
    # as transformers' forward does: a cache passed in is filled and returned even under use_cache=False
    cache_given = cache is not None
    use_cache = self.config.use_cache if use_cache is None else use_cache
    output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
    if inputs_embeds is None:
        inputs_embeds = self.embed_in(input_ids)
    batch, tokens = inputs_embeds.shape[:2]

    if not isinstance(cache, HeadKVCache):
        if isinstance(cache, Cache) and cache.get_seq_length() > 0:
            raise ValueError(
                f"a patched model continues only from a HeadKVCache, got a filled {type(cache).__name__}; "
                "convert it with headkv_engine.methods.HeadAwareCompressor.compress"
            )
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__}")
        if cache is not None and type(cache) is not DynamicCache:
            # (an empty DynamicCache is what generate() passes by default: replaced without a word; Python's
            # default filter shows the warning once per cache type)
            warnings.warn(f"a patched model keeps its own HeadKVCache: the {type(cache).__name__} passed (e.g. "
                          "cache_implementation='static') is not used", stacklevel=2)
        cache = HeadKVCache(handle.profile, position_mode=handle.position_mode, backend=handle.backend)
    if cache.profile is not handle.profile and cache._same_policies_as is not handle.profile:
        cache.profile.check_model(self.config)
        if list(cache.profile.policies()) != list(handle.profile.policies()):
            raise ValueError("the cache was built for another profile than the model is patched with: continue it "
                             "under the profile it was made with (patch_model(model, cache.profile))")
        cache._same_policies_as = handle.profile  # compared once per (cache, profile)
    if cache.position_mode != handle.position_mode:
        raise ValueError(f"the cache was built for position_mode={cache.position_mode!r} and the model is patched "
                         f"with {handle.position_mode!r}: their keys are rotated differently")
    cache.backend = handle.backend  # the patched model's backend computes, whoever built the cache
    new_mask, stored_real = None, None
    if attention_mask is not None:
        # nonzero = a real token, as transformers reads a mask (a float 0.5 too; a cast to long would truncate it)
        real = attention_mask.detach() != 0
        if real.shape == (batch, cache.get_seq_length() + tokens) and cache.get_seq_length() > 0:
            # the stored columns' count travels in the same copy to the host as the new columns
            both = torch.cat([real[:, -tokens:].long(), real[:, :-tokens].sum(1, keepdim=True)], dim=1).to("cpu")
            new_mask, stored_real = both[:, :-1], both[:, -1]
        else:
            new_mask = real[:, -tokens:].long().to("cpu")
    order = None
    if new_mask is not None and new_mask.shape == (batch, tokens) and bool(padding_after_real(new_mask).any()):
        # Padding after a real token (a right-padded batch, a new turn padded on the right): the cache stores a
        # block as padding, then consecutive positions. The columns are reordered so, padding first and real
        # tokens in their order (a token sees the same keys: padding is invisible), and put back at the end.
        order = torch.argsort((new_mask != 0).to(torch.uint8), dim=1, stable=True)
        new_mask = new_mask.gather(1, order)
        order = order.to(inputs_embeds.device)
        inputs_embeds = reorder_columns(inputs_embeds, order)
        if position_ids is not None:
            position_ids = position_ids.expand(batch, tokens).gather(1, order)
    host_positions = cache.begin_step(tokens, batch, new_mask, stored_real)  # (on the host, where the cache counts)
    if position_ids is None or handle.position_mode == "shifted":
        position_ids = host_positions.clamp(min=0).to(inputs_embeds.device)

    hidden_states = self.emb_dropout(inputs_embeds)
    if handle.position_mode == "shifted":
        position_embeddings = rotary_float64_angles(handle, self.rotary_emb, hidden_states, host_positions.clamp(min=0))
    else:
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
    all_hidden_states = (hidden_states,) if output_hidden_states else None
    try:
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=None,
                position_ids=position_ids,
                layer_past=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
    except BaseException as error:
        cache.abort_step(error)  # some layers stored the block, others not: the cache cannot be used further
        raise
    cache.end_step()
    hidden_states = self.final_layer_norm(hidden_states)
    if output_hidden_states:
        all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
    if order is not None:
        inverse = torch.argsort(order, dim=1)
        hidden_states = reorder_columns(hidden_states, inverse)
        if output_hidden_states:
            all_hidden_states = tuple(reorder_columns(h, inverse) for h in all_hidden_states)
    output = BaseModelOutputWithPast(
        last_hidden_state=hidden_states, cache=cache if use_cache or cache_given else None,
        hidden_states=all_hidden_states,
    )
    return output if return_dict else output.to_tuple()


def attention_forward(self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None, **kwargs):
    if not isinstance(layer_past, HeadKVCache):
        raise RuntimeError("a patched GPTNeoX attention runs only inside its patched model's forward")
    batch, tokens = hidden_states.shape[:2]
    qkv = self.query_key_value(hidden_states).view(batch, tokens, -1, 3 * self.head_size).transpose(1, 2)
    query, key, value = qkv.chunk(3, dim=-1)
    cos, sin = position_embeddings
    query_rot, key_rot = apply_rotary_pos_emb(query, key, cos, sin)
    query_sink = None
    if layer_past.position_mode == "shifted":
        # Rotary scores depend on position differences only. In the kept cache a window key sits at the same
        # distance from the query as in the sequence; a sink key at rank j sits at (query rank - j), so sinks
        # are scored with the query rotated by its rank rather than its position.
        ranks = layer_past.sink_query_positions(self.layer_idx, hidden_states.device)
        rotary = self._headkv_rotary
        cos_r, sin_r = rotary(hidden_states, position_ids=ranks.reshape(batch, -1))
        shape = (batch, ranks.shape[1], tokens, cos_r.shape[-1])
        query_sink = rotate(query, cos_r.view(shape).to(query.dtype), sin_r.view(shape).to(query.dtype))
    out = layer_past.attend(self.layer_idx, query_rot, key_rot, value, scale=self.scaling, query_sink=query_sink)
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    return self.dense(out), None
