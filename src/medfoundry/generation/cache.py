"""A preallocated key/value cache with one row per batch slot, each row at its own position.

``transformers``' ``StaticCache`` writes every row of a batch at the same column, which forces left
padding and makes a request that joins a running batch line up with the others. Here each request owns
a row and its tokens sit at columns ``0 .. n-1``: the column of a token is its position, so learned
positions (GPT-2), RoPE (LLaMA) and ALiBi (BLOOM, whose bias is built from the padding mask's running
count) all see exactly what they would see for that request alone. The engine keeps its running
requests in rows ``0 .. batch-1`` (a finished request's row is refilled with the last row), so every
forward reads a plain slice of the buffers: no gather, and no growth by concatenation as in
``DynamicCache``. Columns past a row's own length hold stale values that the attention mask hides.

Before each forward the engine binds the cache to the rows and positions of that forward
(:meth:`SlotCache.bind_prefill` or :meth:`SlotCache.bind_decode`); the model then calls ``update``
once per layer as with any ``transformers`` cache, and builds its causal mask from ``get_mask_sizes``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotCache(Cache):
    """Key/value buffers of shape ``(slots, heads, max_len, head_dim)`` per layer, allocated on first use
    (the head count and size come from the first keys the model writes, so any attention layout fits).

    ``spare`` adds a row and a column no request uses, for a compiled step with dynamic sizes: slicing a buffer
    up to its very end (all the rows, or all the columns) makes the compiler treat that size as a constant, and
    compile a second graph for it."""

    def __init__(self, num_layers: int, slots: int, max_len: int, *, spare: bool = False):
        self.slots, self.max_len, self.spare = slots, max_len, int(spare)
        self.rows = slice(0, 0)  # prefill: the rows written
        self.write_pos: torch.Tensor | None = None  # decode: each row's column (rows 0 .. len-1); None in a prefill
        self.decode_mask: torch.Tensor | None = None  # decode: (rows, kv_len), its width is the columns attended
        self.prefill_len = 0
        self.q_len = 0
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def bind_prefill(self, first_row: int, count: int, end: int, start: int = 0) -> None:
        """The next forward writes the tokens of columns ``start .. end-1`` into rows ``first_row ..``, attending
        over columns ``0 .. end-1`` (a prompt prefilled in pieces: the earlier pieces are in the cache)."""
        self.rows = slice(first_row, first_row + count)
        self.write_pos, self.decode_mask = None, None
        self.prefill_len, self.q_len = end, end - start

    def bind_decode(self, positions: torch.Tensor, mask: torch.Tensor) -> None:
        """The next forward writes one token per row ``0 .. len(positions)-1``, at that row's position, and
        attends over the first ``mask.shape[1]`` columns (the longest row's length). Every size is read from a
        tensor's shape, none kept as an int: a compiled decode step traces them as sizes (the column count
        marked dynamic), where an int attribute (or a slice) would be a constant of the graph."""
        self.write_pos, self.decode_mask = positions, mask
        self.q_len = 1

    @property
    def kv_len(self) -> int:
        """Columns the next forward attends over."""
        return self.prefill_len if self.decode_mask is None else self.decode_mask.shape[1]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of row ``src`` into row ``dst`` (to keep the rows in use contiguous)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[dst, :, :length] = layer.keys[src, :, :length]
                layer.values[dst, :, :length] = layer.values[src, :, :length]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.kv_len, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before the query: the causal mask lets the query see every column up to its own."""
        return self.kv_len - self.q_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.kv_len - self.q_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def memory_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)


class SlotLayer(CacheLayerMixin):
    """One layer's buffers; where to write and what to return come from the owning :class:`SlotCache`."""

    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        owner = self.owner
        shape = (owner.slots + owner.spare, key_states.shape[1], owner.max_len + owner.spare)
        self.keys = torch.zeros(*shape, key_states.shape[-1], dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(*shape, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device)
        # the buffers keep their address for the engine's life: a compiled decode step (CUDA graphs included) may
        # then update them in place as it would a module's buffers, as transformers' StaticCache marks its own
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if owner.write_pos is None:
            start = owner.kv_len - owner.q_len
            self.keys[owner.rows, :, start : owner.kv_len] = key_states
            self.values[owner.rows, :, start : owner.kv_len] = value_states
            return self.keys[owner.rows, :, : owner.kv_len], self.values[owner.rows, :, : owner.kv_len]
        count, columns = owner.write_pos.shape[0], owner.kv_len
        rows = torch.arange(count, device=owner.write_pos.device)
        self.keys[rows, :, owner.write_pos] = key_states[:, :, 0]
        self.values[rows, :, owner.write_pos] = value_states[:, :, 0]
        return self.keys[:count, :, :columns], self.values[:count, :, :columns]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_len - self.owner.q_len

    def get_max_length(self) -> int:
        return self.owner.max_len
