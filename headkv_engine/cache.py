"""HeadKVCache: a transformers `Cache` in which every (sequence, layer, head) keeps only its own tokens.

Layout of one layer (see the README's diagram): one pool of key rows and one of value rows, `[N, head_dim]`,
and a position per row. Head (b, h) owns rows `base[b, h] .. base[b, h] + capacity[b, h]`, of which the first
`length[b, h]` are written. Inside them a token at position p lives at slot

    p                  if p < S          sinks, pinned
    S + (p - S) mod W  otherwise         the window, a ring overwritten in place

(full heads: W unbounded, so slot = p; pruned heads own no rows). Capacity grows by an eighth, 16 to 256 rows at a
time, capped at S + W, so a full head holds little unused room, a decode step copies nothing until a head runs out,
and nothing is copied per step once a window head is full.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from headkv_engine import ops
from headkv_engine.ops._checks import mark_positions_checked
from headkv_engine.profile import Profile

GROWTH_MIN_ROWS = 16
GROWTH_MAX_ROWS = 256


@dataclass
class LayerStore:
    """The ragged K/V storage of one layer.

    Pools and policy tensors live on the layer's device. The bookkeeping (`base`, `capacity`, `length`) is
    kept on the host, so deciding growth never waits on the device; `base_dev` / `length_dev` mirror it there.
    """

    k_pool: torch.Tensor  # [N, D]
    v_pool: torch.Tensor  # [N, D]
    pos_pool: torch.Tensor  # [N] int64, absolute position of each written row
    base: torch.Tensor  # [B, H] int64 (host), first row of each head
    capacity: torch.Tensor  # [B, H] int64 (host), rows owned
    length: torch.Tensor  # [B, H] int64 (host), rows written (= tokens kept)
    max_kept: torch.Tensor  # [H] int64 (host), S + W
    sink_size: torch.Tensor  # [H] int64
    window_size: torch.Tensor  # [H] int64 (full heads: UNBOUNDED_WINDOW, pruned: 0)
    fill: torch.Tensor | None  # [H, D] float32, output of heads that see nothing
    base_dev: torch.Tensor | None = None
    length_dev: torch.Tensor | None = None

    def __post_init__(self):
        self.base_dev = self.base.to(self.k_pool.device)
        self.length_dev = self.length.to(self.k_pool.device)

    def kept_after(self, seen: torch.Tensor) -> torch.Tensor:
        """Tokens kept per head once `seen` [B] (host) tokens have been stored: [B, H] (host)."""
        return torch.minimum(seen[:, None], self.max_kept[None, :])

    def set_length(self, kept: torch.Tensor) -> None:
        self.length = kept
        self.length_dev = kept.to(self.k_pool.device, non_blocking=True)

    def reserve(self, needed: torch.Tensor) -> None:
        """Make capacity >= needed [B, H], growing geometrically (capped at S + W) and moving the written rows."""
        if bool((needed <= self.capacity).all()):
            return
        # Growth by 1/8 of the capacity, GROWTH_MIN_ROWS to GROWTH_MAX_ROWS at a time: a full head holds at most
        # 12.5% (and at most 256 rows) unused, and during decode the pool is moved once per >= 16 steps (once per
        # 256 steps on long contexts), a copy that costs about what one step's attention over it reads. The
        # first allocation (a prefill) and any block larger than the step are exact.
        step = torch.where(self.capacity > 0,
                           torch.clamp(self.capacity // 8, min=GROWTH_MIN_ROWS, max=GROWTH_MAX_ROWS), 0)
        grown = torch.maximum(needed, self.capacity + step)
        new_capacity = torch.where(needed > self.capacity, torch.minimum(grown, self.max_kept[None, :]), self.capacity)
        self._rebuild(self.base, new_capacity, self.length)

    def select(self, index: torch.Tensor) -> None:
        """Keep the sequences `index` [B'] (host int64, repeats allowed), in that order: beam reordering,
        expansion and selection of a batch."""
        self._rebuild(self.base[index], self.capacity[index], self.length[index])

    def _rebuild(self, source_base: torch.Tensor, new_capacity: torch.Tensor, length: torch.Tensor) -> None:
        """New pools of `new_capacity` [B, H] rows per head; head (b, h) receives the `length[b, h]` written rows
        starting at row `source_base[b, h]` of the current pools, each in its slot."""
        new_base = (torch.cumsum(new_capacity.flatten(), 0) - new_capacity.flatten()).view_as(new_capacity)
        rows = int(new_capacity.sum())
        k_pool = self.k_pool.new_empty(rows, self.k_pool.shape[1])
        v_pool = self.v_pool.new_empty(rows, self.v_pool.shape[1])
        pos_pool = self.pos_pool.new_full((rows,), -1)
        counts = length.flatten()
        total = int(counts.sum())
        if total > 0:
            head_start = torch.cumsum(counts, 0) - counts
            offset = torch.arange(total) - torch.repeat_interleave(head_start, counts)
            device = self.k_pool.device
            src = (torch.repeat_interleave(source_base.flatten(), counts) + offset).to(device)
            dst = (torch.repeat_interleave(new_base.flatten(), counts) + offset).to(device)
            k_pool[dst] = self.k_pool[src]
            v_pool[dst] = self.v_pool[src]
            pos_pool[dst] = self.pos_pool[src]
        self.k_pool, self.v_pool, self.pos_pool = k_pool, v_pool, pos_pool
        self.base, self.capacity = new_base, new_capacity
        self.base_dev = new_base.to(k_pool.device)
        if length is not self.length:
            self.set_length(length.clone())

    def nbytes(self) -> int:
        return self.k_pool.numel() * self.k_pool.element_size() + self.v_pool.numel() * self.v_pool.element_size()

    def kept_nbytes(self) -> int:
        row = self.k_pool.shape[1] * self.k_pool.element_size() + self.v_pool.shape[1] * self.v_pool.element_size()
        return int(self.length.sum()) * row


def padding_after_real(real: torch.Tensor) -> torch.Tensor:
    """[B, T - 1] bool: column t + 1 of a row is padding right after a real token at t (real: [B, T], 0 = padding);
    a cache stores a block only as padding, then real tokens."""
    return (real[:, 1:] == 0) & (real[:, :-1] != 0)


class HeadKVCache(Cache):
    """A ragged per-head KV cache driven by a `Profile`; created by a patched model's forward.

    `get_seq_length()` counts input columns (padding included), as transformers' generation expects;
    positions, windows and sinks count each sequence's real tokens only (padding is never stored).
    """

    def __init__(self, profile: Profile, position_mode: str = "absolute", backend: str = "auto"):
        super().__init__(layers=[])
        if position_mode not in ("absolute", "shifted"):
            raise ValueError(f"position_mode must be 'absolute' or 'shifted', got {position_mode!r}")
        self.profile = profile
        self.position_mode = position_mode
        self.backend = backend
        self.stores: list[LayerStore | None] = [None] * profile.num_layers
        self.seen: torch.Tensor | None = None  # [B] real tokens stored per sequence (CPU)
        self.columns = 0
        self._positions: torch.Tensor | None = None  # [B, T] of the step being computed, -1 = padding
        self._positions_on: dict[torch.device, torch.Tensor] = {}
        self._seen_after: torch.Tensor | None = None  # [B] (host) once the step's tokens are stored
        self._all_real = True
        self._policies: dict = {}
        self._failed: str | None = None  # why a forward stopped half-way through this cache
        self._same_policies_as: Profile | None = None  # a patch profile found equal to this cache's

    @classmethod
    def from_dense(cls, profile: Profile, key_values, attention_mask=None, position_mode="absolute", backend="auto"):
        """A HeadKVCache holding what `profile` keeps of a dense cache, as if its tokens had been prefilled.

        key_values: a transformers DynamicCache or a sequence of (keys, values) per layer, [B, H, T, D] each,
        keys rotated at each sequence's real-token positions (as `generate()` stores them; a plain forward of a
        left-padded batch rotates at column indices unless given position_ids from the mask);
        attention_mask [B, T] marks left padding.
        """
        if isinstance(key_values, Cache):
            key_values = [(layer.keys, layer.values) for layer in key_values.layers]
        key_values = list(key_values)
        if len(key_values) != profile.num_layers:
            raise ValueError(f"key_values: expected {profile.num_layers} layers, got {len(key_values)}")
        first = key_values[0][0]
        if not isinstance(first, torch.Tensor) or first.dim() != 4:
            raise ValueError("key_values: expected keys and values [batch, heads, tokens, head_dim] in every layer "
                             f"(a filled cache), got {None if first is None else tuple(getattr(first, 'shape', ()))}")
        batch, heads, tokens, head_dim = first.shape
        if heads != profile.num_heads:
            raise ValueError(f"key_values: expected {profile.num_heads} heads, got {heads}")
        if profile.head_dim is not None and head_dim != profile.head_dim:
            raise ValueError(f"key_values: expected head_dim {profile.head_dim} (the profile's), got {head_dim}")
        for layer, (keys, values) in enumerate(key_values):
            if keys is None or keys.shape != first.shape or values is None or values.shape != first.shape:
                got = [None if t is None else tuple(t.shape) for t in (keys, values)]
                raise ValueError(f"key_values: layer {layer} holds keys/values of shapes {got}, expected "
                                 f"{tuple(first.shape)} like layer 0")
        cache = cls(profile, position_mode=position_mode, backend=backend)
        cache.begin_step(tokens, batch, attention_mask)
        for layer, (keys, values) in enumerate(key_values):
            store = cache._store(layer, keys)
            kept = store.kept_after(cache._seen_after)
            store.reserve(kept)
            cache._append(store, keys, values, cache.positions_on(keys.device), cache._backend_for(keys, values))
            store.set_length(kept)
        cache.end_step()
        return cache

    # --- the step protocol used by the patched model ------------------------------------------------------

    def begin_step(self, num_tokens: int, batch_size: int, attention_mask: torch.Tensor | None = None,
                   stored_real: torch.Tensor | None = None) -> torch.Tensor:
        """Assign positions to a block of `num_tokens` new columns; returns them, [B, T] int64 (-1 = padding).

        `attention_mask` holds the block's columns (1 = real token); padding may only precede real tokens.
        `stored_real` [B] (host): the real tokens a full-width mask gives the columns already stored; a stored token
        cannot be turned into padding afterwards, so a count other than the cache's is refused.
        """
        if self._failed is not None:
            raise RuntimeError(f"this HeadKVCache was left incomplete by a forward that failed ({self._failed}); "
                               "start again from a new cache")
        if self.seen is not None and self.seen.shape[0] != batch_size:
            raise ValueError(f"batch size changed from {self.seen.shape[0]} to {batch_size} within one HeadKVCache")
        seen = torch.zeros(batch_size, dtype=torch.long) if self.seen is None else self.seen
        if stored_real is not None and not torch.equal(stored_real, seen):
            row = int((stored_real != seen).nonzero()[0, 0])
            raise ValueError(
                f"attention_mask: its columns of the {self.columns} tokens already in the cache give sequence {row} "
                f"{int(stored_real[row])} real tokens, the cache stored {int(seen[row])}: a token once stored stays "
                "visible (evicted ones are gone), so the mask of the stored columns must stay as it was given"
            )
        if attention_mask is None:
            real = torch.ones(batch_size, num_tokens, dtype=torch.long)
        else:
            # (as transformers reads a 2-d mask: any nonzero value is a real token)
            real = (attention_mask.detach().to("cpu") != 0).long()
            if real.shape != (batch_size, num_tokens):
                raise ValueError(
                    f"attention_mask must cover the new tokens: expected {(batch_size, num_tokens)}, "
                    f"got {tuple(real.shape)}"
                )
        counted = seen[:, None] + torch.cumsum(real, dim=1) - 1
        positions = torch.where(real.bool(), counted, torch.full_like(counted, -1))
        after_real = padding_after_real(real)
        if bool(after_real.any()):
            row, col = (int(i) for i in after_real.nonzero()[0])
            raise ValueError(
                f"attention_mask: a block stored in a HeadKVCache has its padding before its real tokens (left "
                f"padding); row {row} has padding at column {col + 1} after a real token (a patched model's "
                "forward reorders such a block itself; HeadKVCache.from_dense takes left padding only)"
            )
        self.seen = seen  # only now: a refused block leaves the cache as it was
        self._positions = positions
        self._positions_on = {positions.device: positions}
        mark_positions_checked(positions)
        self._seen_after = seen + real.sum(dim=1)
        self._all_real = bool(real.all())
        return positions

    def end_step(self) -> None:
        self.seen = self._seen_after
        self.columns += self._positions.shape[1]
        self._positions = None
        self._positions_on = {}

    def abort_step(self, error: BaseException) -> None:
        """A forward failed within the step: some layers hold its tokens, others not. Later steps are refused."""
        self._failed = f"{type(error).__name__}: {error}"
        self._positions = None
        self._positions_on = {}

    def positions_on(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._positions_on:
            self._positions_on[device] = self._positions.to(device)
            # begin_step built them padding-then-consecutive: the ops need not read them back to check
            mark_positions_checked(self._positions_on[device])
        return self._positions_on[device]

    def sink_query_positions(self, layer_idx: int, device) -> torch.Tensor:
        """Shifted mode: the rank each query takes in its head's kept cache, min(t, S+W-1): [B, H, T]."""
        sink, window, _ = self._policy_tensors(layer_idx, device)
        max_kept = sink + window
        positions = self.positions_on(device)
        return torch.minimum(positions[:, None, :], (max_kept - 1)[None, :, None]).clamp(min=0)

    def _policy_tensors(self, layer_idx: int, device):
        key = (layer_idx, torch.device(device))
        if key not in self._policies:
            self._policies[key] = self.profile.layer_tensors(layer_idx, device=device)
        return self._policies[key]

    def _store(self, layer_idx: int, key: torch.Tensor) -> LayerStore:
        store = self.stores[layer_idx]
        if store is None:
            batch, heads, _, head_dim = key.shape
            sink, window, fill = self._policy_tensors(layer_idx, key.device)
            host_sink, host_window, _ = self._policy_tensors(layer_idx, "cpu")
            zeros = torch.zeros(batch, heads, dtype=torch.long)
            store = LayerStore(
                k_pool=key.new_empty(0, head_dim),
                v_pool=key.new_empty(0, head_dim),
                pos_pool=torch.empty(0, dtype=torch.long, device=key.device),
                base=zeros,
                capacity=zeros.clone(),
                length=zeros.clone(),
                max_kept=host_sink + host_window,
                sink_size=sink,
                window_size=window,
                fill=fill,
            )
            self.stores[layer_idx] = store
        return store

    def attend(self, layer_idx, query, key, value, *, scale, query_sink=None) -> torch.Tensor:
        """Attention of the step's queries [B, H, T, D] under the profile, storing the step's keys/values.

        Decode steps (one real token per sequence) append first and attend over the kept rows; blocks attend
        over the kept rows plus themselves with the per-head masks, then keep what stays visible.
        """
        store = self._store(layer_idx, key)
        positions = self.positions_on(key.device)
        kept = store.kept_after(self._seen_after)
        backend = self._backend_for(query, key, value)
        if key.shape[2] == 1 and self._all_real:
            store.reserve(kept)
            self._append(store, key, value, positions, backend)
            store.set_length(kept)
            out = ops.decode_attention(
                query[:, :, 0], store.k_pool, store.v_pool, store.base_dev, store.length_dev, scale=scale,
                sink_size=store.sink_size, q_sink=None if query_sink is None else query_sink[:, :, 0],
                fill=store.fill, backend=backend, max_length=int(kept.max()),
            )
            return out[:, :, None]
        out = ops.prefill_attention(
            query, key, value, positions, store.k_pool, store.v_pool, store.pos_pool, store.base_dev, store.length_dev,
            store.sink_size, store.window_size, scale=scale, q_sink=query_sink, fill=store.fill, backend=backend,
        )
        store.reserve(kept)
        self._append(store, key, value, positions, backend)
        store.set_length(kept)
        return out

    def _backend_for(self, *tensors) -> str:
        """The cache's backend, or the torch reference while autograd records (the compiled, Triton and Metal kernels
        have no backward; their outputs would carry no gradient), with a warning (which Python's default filter
        shows once per calling line)."""
        if self.backend == "torch" or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
            return self.backend
        warnings.warn(
            f"HeadKVCache: autograd records gradients (no torch.no_grad()), so attention and appends are computed "
            f"by the torch reference instead of backend {self.backend!r}, which has no backward; wrap inference in "
            "torch.no_grad() for the kernels' speed",
            stacklevel=2,
        )
        return "torch"

    def _append(self, store: LayerStore, key, value, positions, backend) -> None:
        if store.k_pool.shape[0] == 0:
            return
        ops.append(
            store.k_pool, store.v_pool, store.pos_pool, store.base_dev, key, value, positions,
            store.sink_size, store.window_size, backend=backend,
        )

    # --- what users and transformers ask of a Cache -------------------------------------------------------

    def __len__(self) -> int:
        return self.profile.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    # Cache derives these from `self.layers`, which a HeadKVCache does not use; over an empty list they would
    # say "every layer is linear attention" (so generate() would feed an already cached prompt again) and
    # "croppable".
    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.profile.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.profile.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.profile.num_layers

    @property
    def is_croppable(self) -> bool:
        return False  # evicted tokens are gone: `crop` cannot restore an earlier state

    @property
    def batch_size(self) -> int:
        return -1 if self.seen is None else int(self.seen.shape[0])

    @property
    def is_initialized(self) -> bool:
        return self.seen is not None

    def kept_tokens(self, layer_idx: int) -> torch.Tensor:
        """Tokens each (sequence, head) of the layer holds: LongTensor [batch, heads]."""
        store = self.stores[layer_idx]
        if store is None:
            batch = 0 if self.seen is None else self.seen.shape[0]
            return torch.zeros(batch, self.profile.num_heads, dtype=torch.long)
        return store.length.clone()  # host copy

    def nbytes(self) -> int:
        """Bytes of key/value storage really allocated, all layers (positions index not included)."""
        return sum(store.nbytes() for store in self.stores if store is not None)

    def kept_nbytes(self) -> int:
        """Bytes of the key/value rows written (the tokens kept), all layers: nbytes() less the room full heads
        hold for growth (an eighth of their rows, at least 16 and at most 256)."""
        return sum(store.kept_nbytes() for store in self.stores if store is not None)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError(
            "HeadKVCache stores a ragged per-head layout and is driven by a model patched with "
            "headkv_engine.patch_model; an unpatched model cannot update it"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b continues what sequence beam_idx[b] holds (rows are copied, once per step)."""
        self._select_sequences(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices` (int64 indices, or a bool mask over the batch)."""
        indices = torch.as_tensor(indices).to("cpu")
        self._select_sequences(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence `repeats` times in a row (as the inputs are expanded for beams or samples)."""
        if self.seen is not None:
            self._select_sequences(torch.arange(self.seen.shape[0]).repeat_interleave(repeats))

    def _select_sequences(self, index: torch.Tensor) -> None:
        if self.seen is None:
            return
        index = torch.as_tensor(index).to("cpu", torch.long)
        batch = self.seen.shape[0]
        if index.dim() != 1 or (index.numel() and (int(index.min()) < -batch or int(index.max()) >= batch)):
            raise ValueError(f"sequence index: expected a 1-d index into the batch of {batch}, got {index.tolist()}")
        index = index % batch
        if torch.equal(index, torch.arange(batch)):  # beams that all continue themselves: nothing moves
            return
        for store in self.stores:
            if store is not None:
                store.select(index)
        self.seen = self.seen[index]

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "HeadKVCache cannot be cropped: evicted tokens are gone (assisted decoding is unsupported)"
        )

    def reset(self) -> None:
        self.stores = [None] * self.profile.num_layers
        self.seen = None
        self.columns = 0
        self._failed = None

    def __repr__(self) -> str:
        return (
            f"HeadKVCache(layers={self.profile.num_layers}, heads={self.profile.num_heads}, "
            f"tokens={self.columns}, nbytes={self.nbytes()}, position_mode={self.position_mode!r})"
        )
