"""The KV cache and attention masks behind exact Jacobi decoding, and the check that a model fits them.

Jacobi decoding rolls the cache back after every pass (`crop`) and leaves masked holes where a row of the
batch committed fewer tokens than another, so it needs every attention layer to keep one key and value per
token, and every token to see exactly the keys greedy decoding would show it.

Full attention: the 2-D padding mask over the cache plus the window is enough; transformers adds causality
by index, which within a row is also causality by position, holes excluded.

Sliding-window attention (Mistral, Gemma 2/3, ...): transformers' sliding cache layers drop old tokens and
cannot be cropped, and its window is counted in cache indices, which holes make differ from positions. So
every layer keeps every token here, and the 4-D masks are built from each row's real positions: a query at
position q sees a key at position k when k <= q and q - k < sliding_window (transformers' convention: the
window holds the query itself and the sliding_window - 1 tokens before it, for Gemma as for Mistral).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from cllm.errors import UnsupportedModelError

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
NO_CACHE_LAYER_TYPES = ("dummy",)  # attention-free layers, and layers reading another layer's KV
RECURRENT_LAYER_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding")
EXPLICIT_MASK_IMPLEMENTATIONS = ("eager", "sdpa")  # those that take a ready 4-D mask as it is


@dataclass(frozen=True)
class AttentionLayout:
    """What the masks must look like for one model: its layers' attention kinds and its window."""

    layer_types: tuple[str, ...]
    sliding_window: int | None  # None when no layer slides
    implementation: str
    dtype: torch.dtype
    # False for families that number positions from the 2-D mask (`POSITIONS_FROM_MASK`): a 4-D mask
    # cannot describe multi-block branches to them
    explicit_masks: bool = True

    @property
    def slides(self) -> bool:
        return self.sliding_window is not None

    @property
    def mixed(self) -> bool:
        return len(set(self.layer_types) & set(ATTENTION_LAYER_TYPES)) > 1


# Families that pass the structural checks below yet decode wrongly through this engine (found by running
# every causal-LM family of transformers 5.24 against generate), and why.
INEXACT_FAMILIES = {
    "git": "it keeps image tokens in the cache, and its text-only padding mask is widened over them",
    "gpt_neo": "its local-attention layers count their window in cache slots, which the cache's holes shift",
    "moshi": "its sliding window comes only from truncating the cache (its masks are plain causal), so its "
             "greedy output depends on how the cache is filled",
    "xlm": "its cache is a dict of its own, not a per-token transformers Cache",
}
# RNN families that transformers marks neither as stateful nor by recurrent layer types (it excludes them from
# DynamicCache by name).
RECURRENT_FAMILIES = ("rwkv", "xlstm")
RECURRENT_REASON = ("it keeps a recurrent state (state-space, linear-attention or RNN layers) instead of a per-token "
                    "KV cache, so a pass cannot be rolled back to the last committed token")
# Families whose forward takes no position_ids yet numbers tokens from the attention mask (ALiBi over the
# mask's cumulative sum), which skips the cache's holes as position ids would.
POSITIONS_FROM_MASK = ("bloom",)


@functools.cache
def forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def refuse(model, reason: str) -> UnsupportedModelError:
    family = getattr(model.config, "model_type", None) or "unknown"
    return UnsupportedModelError(
        f"{type(model).__name__} ({family}) cannot be decoded exactly by Jacobi decoding: {reason}")


def recurrent_layer_types(config) -> list[str]:
    """The recurrent layer kinds named by the config's layer types (state-space models list theirs as
    'linear_attention' from transformers 5.25 on)."""
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, KeyError, TypeError):
        return []
    return [layer_type for layer_type in dict.fromkeys(layer_types) if layer_type in RECURRENT_LAYER_TYPES]


def unsupported_reason(model) -> str | None:
    """Why the model's cache, positions or causality rule exact Jacobi decoding out; None when they do not."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family in INEXACT_FAMILIES:
        return INEXACT_FAMILIES[family]
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; only decoder-only causal LMs are supported"
    if getattr(model, "_is_stateful", False) or family in RECURRENT_FAMILIES or recurrent_layer_types(config):
        return RECURRENT_REASON
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    parameters = forward_parameters(type(model))
    if supports_dynamic is None or not supports_dynamic() or not {"cache", "past_key_values"} & set(parameters):
        return "it does not take transformers' per-token KV cache (DynamicCache)"
    if "position_ids" not in parameters and family not in POSITIONS_FROM_MASK:
        return ("its forward takes no position_ids, so it numbers tokens by cache slot, and the holes Jacobi "
                "decoding leaves in the cache would shift them")
    text_config = config.get_text_config(decoder=True)
    if getattr(text_config, "is_causal", True) is False or getattr(text_config, "use_bidirectional_attention", False):
        return "its attention is bidirectional, so it is not an autoregressive LM"
    if getattr(text_config, "is_decoder", None) is False and hasattr(text_config, "add_cross_attention"):
        return "it is an encoder (BERT-like) whose attention is bidirectional unless its config sets is_decoder=True"
    bidirectional = sorted({type(module).__name__ for module in model.modules()
                            if getattr(module, "is_causal", None) is False
                            and not getattr(module, "is_cross_attention", False)})
    if bidirectional:
        return f"its {', '.join(bidirectional)} attention is bidirectional (is_causal=False)"
    return None


def check_supported(model) -> AttentionLayout:
    """The model's attention layout, or an UnsupportedModelError naming the family and why its output would not
    be exact."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise refuse(model, reason)
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except (AttributeError, KeyError, TypeError) as err:
        raise refuse(model, f"transformers cannot tell its per-layer attention layout ({err})") from err
    for layer_type in dict.fromkeys(layer_types):
        if layer_type not in ATTENTION_LAYER_TYPES + NO_CACHE_LAYER_TYPES:
            raise refuse(model, f"its {layer_type!r} layers have no exact Jacobi attention mask here "
                                "(supported: full and sliding-window attention)")
    windows = {kwargs["sliding_window"] for kwargs in layer_kwargs if "sliding_window" in kwargs}
    if len(windows) > 1:
        raise refuse(model, f"its layers use different sliding windows {sorted(windows)}")
    window = windows.pop() if windows else None
    implementation = model.config._attn_implementation
    if window is not None and implementation not in EXPLICIT_MASK_IMPLEMENTATIONS:
        raise refuse(model, f"its sliding window needs explicit 4-D masks, which the {implementation!r} attention "
                            f"implementation does not take; load it with attn_implementation='sdpa' or 'eager'")
    explicit_masks = getattr(model.config, "model_type", None) not in POSITIONS_FROM_MASK
    return AttentionLayout(tuple(layer_types), window, implementation, model.dtype, explicit_masks)


def new_cache(model) -> DynamicCache:
    """An empty cache whose attention layers all keep every token, so `crop` can always roll a pass back.

    Sliding-window layers become full layers: the window is applied by the mask instead.
    """
    cache = DynamicCache(config=model.config)
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer for layer in cache.layers]
    return cache


def visible_keys(key_mask: torch.Tensor, query_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[batch, queries, keys]: which keys each query attends to, decided by positions, never by cache index.

    `key_mask` [batch, keys] marks the real tokens among cache + new slots (holes and padding are False); the
    real tokens of a row hold positions 0, 1, 2, ... in cache order, so a key's position is its rank.
    """
    key_positions = key_mask.long().cumsum(-1) - 1
    distance = query_positions[:, :, None] - key_positions[:, None, :]
    visible = key_mask[:, None, :] & (distance >= 0)
    if window is not None:
        visible &= distance < window
    return visible


def as_attention_mask(visible: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """The 4-D form the attention implementation takes: boolean for sdpa, additive for eager."""
    visible = visible[:, None]
    if layout.implementation == "sdpa":
        return visible
    blocked = torch.finfo(layout.dtype).min
    return torch.where(visible, torch.zeros((), dtype=layout.dtype, device=visible.device), blocked)


def forward_mask(
    layout: AttentionLayout, key_mask: torch.Tensor, query_positions: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The `attention_mask` argument of one forward pass over new tokens at `query_positions`.

    Without a sliding window, the 2-D key mask as is; with one, ready 4-D masks (one per layer type when
    full and sliding layers mix, which is how transformers' mixed-layer models take them).
    """
    if not layout.slides:
        return key_mask
    sliding = as_attention_mask(visible_keys(key_mask, query_positions, layout.sliding_window), layout)
    if not layout.mixed:
        return sliding
    full = as_attention_mask(visible_keys(key_mask, query_positions, None), layout)
    return {"full_attention": full, "sliding_attention": sliding}


class ReservedLayer(DynamicLayer):
    """A cache layer for the serving engine: `keys`/`values` are views `[:rows, :, start:end]` of buffers
    with spare rows and columns, so the engine's frequent changes copy only what changes.

    `DynamicLayer` concatenates on every pass (a copy of the whole cache per layer per pass) and a row
    leaving or joining copies every row. Here a pass writes its window into spare columns, a joining row
    is written into a spare row, a leaving row is overwritten by the last row, and columns that no row
    uses any more on the left are dropped by moving `start`. The cache is copied whole only into larger
    buffers (when the spare rows or columns run out) or to drop holes scattered in the middle.

    Spare rows follow the live rows (twice as many, up to `max_rows`) instead of being reserved for
    `max_rows` at once: every copy writes the whole buffer, so a few live rows in buffers sized for many
    would pay for the empty ones on each copy.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, max_rows: int | None = None):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.rows, self.start, self.max_rows = 0, 0, max_rows
        self.key_buffer = self.value_buffer = None
        self.relocate(keys, values, self.row_room(keys.shape[0]), 2 * keys.shape[-2])

    def row_room(self, rows: int) -> int:
        """The row capacity of a new buffer for `rows` live rows."""
        room = 2 * rows if self.max_rows is None else min(2 * rows, self.max_rows)
        return max(rows, room, 1)

    def relocate(self, keys: torch.Tensor, values: torch.Tensor, row_capacity: int, column_capacity: int,
                 left: int = 0) -> None:
        """Copy `keys`/`values` into new zeroed buffers from column `left` on (zeros: a masked hole must
        hold a finite value)."""
        shape = (row_capacity, keys.shape[1], column_capacity, keys.shape[-1])
        self.key_buffer = keys.new_zeros(shape)
        self.value_buffer = values.new_zeros(shape[:3] + (values.shape[-1],))
        rows, width = keys.shape[0], keys.shape[-2]
        self.key_buffer[:rows, :, left : left + width] = keys
        self.value_buffer[:rows, :, left : left + width] = values
        self.rows, self.start = rows, left
        self.set_view(left + width)

    def set_view(self, end: int) -> None:
        self.keys = self.key_buffer[: self.rows, :, self.start : end]
        self.values = self.value_buffer[: self.rows, :, self.start : end]
        self.end = end

    def adopt(self) -> None:
        """Re-link `keys`/`values` to buffers if something assigned them directly (deepcopy, slicing)."""
        if not self.adopted():
            self.relocate(self.keys, self.values, self.row_room(self.keys.shape[0]), 2 * self.keys.shape[-2])

    def adopted(self) -> bool:
        """Whether `keys` is still this layer's view (code that assigns `keys` itself breaks the link)."""
        return self.keys.data_ptr() == self.key_buffer[:, :, self.start :].data_ptr() and (
            self.keys.shape[0], self.keys.shape[-2]) == (self.rows, self.end - self.start)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.adopt()
        new = key_states.shape[-2]
        if self.end + new > self.key_buffer.shape[2]:
            width = self.end - self.start
            self.relocate(self.keys, self.values, self.row_room(self.rows), 2 * (width + new))
        self.key_buffer[: self.rows, :, self.end : self.end + new] = key_states
        self.value_buffer[: self.rows, :, self.end : self.end + new] = value_states
        self.set_view(self.end + new)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the number of tokens to remove, as a negative number")
        self.adopt()
        self.set_view(self.end + tokens_to_remove)

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows below the current ones, their columns aligned to the right end; the narrower side gets
        masked holes on the left (the new rows' holes are zeroed; the cache's are made by moving `start`)."""
        self.adopt()
        joining, width = keys.shape[-2], self.end - self.start
        if joining > self.start + width or self.rows + keys.shape[0] > self.key_buffer.shape[0]:
            # too wide for the room on the left, or no spare rows: copy into larger buffers, room on the left
            room = max(0, joining - width)
            self.relocate(self.keys, self.values, self.row_room(self.rows + keys.shape[0]),
                          room + 2 * (width + joining), left=room)
        if joining > self.end - self.start:  # wider than the cache: its rows get holes on the left
            self.start = self.end - joining
            self.key_buffer[: self.rows, :, self.start : self.end - width] = 0
            self.value_buffer[: self.rows, :, self.start : self.end - width] = 0
        rows = slice(self.rows, self.rows + keys.shape[0])
        self.key_buffer[rows, :, self.start : self.end - joining] = 0
        self.value_buffer[rows, :, self.start : self.end - joining] = 0
        self.key_buffer[rows, :, self.end - joining : self.end] = keys
        self.value_buffer[rows, :, self.end - joining : self.end] = values
        self.rows += keys.shape[0]
        self.set_view(self.end)

    def move_rows(self, sources: list[int], targets: list[int], rows: int) -> None:
        """Copy row sources[i] over row targets[i], then keep the first `rows` rows."""
        self.adopt()
        for source, target in zip(sources, targets, strict=True):
            self.key_buffer[target, :, self.start : self.end] = self.key_buffer[source, :, self.start : self.end]
            self.value_buffer[target, :, self.start : self.end] = self.value_buffer[source, :, self.start : self.end]
        self.rows = rows
        self.set_view(self.end)

    def drop_left(self, columns: int) -> None:
        """Forget the first `columns` columns (no row attends to them any more): no copy."""
        self.adopt()
        self.start += columns
        self.set_view(self.end)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`, in that order (a general reordering: copies the rows kept)."""
        self.adopt()
        keys, values = self.keys[indices], self.values[indices]
        self.key_buffer[: len(indices), :, self.start : self.end] = keys
        self.value_buffer[: len(indices), :, self.start : self.end] = values
        self.rows = len(indices)
        self.set_view(self.end)

    def keep_columns(self, index: torch.Tensor) -> None:
        """Keep only columns `index` (holes scattered in the middle): copies the cache into new buffers."""
        self.adopt()
        keys, values = self.keys.index_select(-2, index), self.values.index_select(-2, index)
        self.relocate(keys, values, self.row_room(self.rows), 2 * len(index))
