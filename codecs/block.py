"""The public codec API: encode a block of KV cache into one payload, decode it back.

A block is the KV of ``n_tokens`` consecutive tokens starting at absolute position ``start``,
for every layer. Steps, all in torch on the tensors' device: keys' RoPE removed (pr<T>,
optional; put back on decode at the kept tokens' positions) -> eviction (optional) -> fp16 sink
tokens, the 8-bit newest tokens (hp<N>) and the 2-bit demoted ones (lo<L>) split off (optional)
-> per-tensor codec (fp16, lossless byte planes, fp8, integer codes) -> one device-to-host copy of
all sections -> zstd per section (lossless, or option z) -> header. ``len(payload)`` is every byte stored for the block.

Why one long module: encode and decode of the format's sections mirror each other line for
line; keeping them together is what keeps them in step (``format.py`` holds the layout).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deltastore.codecs.base import Fp16Codec, TensorCodec, as_bytes, to_fp16
from deltastore.codecs.entropy import compress, decompress
from deltastore.codecs.eviction import gather_tokens, importance, keep_indices, low_slots, mask_from_indices
from deltastore.codecs.format import (
    DTYPE_CODES,
    FLAG_ZSTD,
    BlockHeader,
    Section,
    check_dims,
    high_token_nbytes,
    pack_header,
    quant_part_sizes,
    read_header,
    section_sizes,
)
from deltastore.codecs.fp8 import Fp8Codec
from deltastore.codecs.lossless import LosslessCodec
from deltastore.codecs.packing import pack_bits, unpack_bits
from deltastore.codecs.quant import IntCodec
from deltastore.codecs.rope import apply_rope, remove_rope
from deltastore.codecs.spec import CodecSpec
from deltastore.errors import CodecError, FormatError

__all__ = ["BlockDecoder", "DecodedBlock", "decode_block", "decode_blocks", "encode_block"]

Layers = Sequence[tuple[torch.Tensor, torch.Tensor]]

_STACK_ELEMENTS = 1 << 20  # elements per tensor kind that one encode call takes, layers stacked
_RUN_ELEMENTS = 1 << 24  # decoded elements per tensor kind of one run of blocks decoded together


@dataclass
class DecodedBlock:
    """A decoded block.

    Attributes:
        layers: per layer (K, V), each (kv_heads, kept, head_dim), kept tokens in position order.
        positions: per layer (kv_heads, kept) int64 absolute positions of the kept tokens
            (without eviction, one (kv_heads, n_tokens) tensor shared by every layer).
        n_tokens: tokens in the block before eviction; start: absolute position of the first.
        spec: the codec it was encoded with; dtype: the original dtype name.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    positions: list[torch.Tensor]
    n_tokens: int
    start: int
    spec: CodecSpec
    dtype: str

    @property
    def kept(self) -> int:
        """Tokens per head after eviction."""
        return self.layers[0][0].shape[1]


def _codecs(spec: CodecSpec, dtype: torch.dtype, layer: int = 0) -> tuple[TensorCodec, TensorCodec]:
    """(key codec, value codec) for ``spec`` in ``layer`` (up<layers> changes its bits)."""
    if spec.kind == "fp16":
        return Fp16Codec(), Fp16Codec()
    if spec.kind == "lossless":
        return LosslessCodec(dtype), LosslessCodec(dtype)
    if spec.kind == "fp8":
        return Fp8Codec(spec.group_size), Fp8Codec(spec.group_size)
    key_bits, value_bits = spec.layer_bits(layer)
    return (
        IntCodec(key_bits, spec.group_size, spec.key_axis, spec.rotate, spec.params8, _levels(spec, "k")),
        IntCodec(value_bits, spec.group_size, "token", spec.rotate, spec.params8, _levels(spec, "v")),
    )


def _layer_runs(spec: CodecSpec, layers: range) -> list[tuple[int, int]]:
    """[first, end) of each run of consecutive ``layers`` coded at the same bits (one run without
    up<layers>)."""
    runs: list[tuple[int, int]] = []
    for i in layers:
        if runs and spec.layer_bits(i) == spec.layer_bits(runs[-1][0]):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _levels(spec: CodecSpec, kind: str) -> str | None:
    """The ``nf`` level table of keys ("k") or values ("v"), or None for uniform codes."""
    return kind if spec.nf else None


def _high_codec(spec: CodecSpec) -> IntCodec:
    """hp<N>'s codec for both keys and values of the newest tokens: 8 bits, per-token groups."""
    return IntCodec(8, spec.group_size, "token", spec.rotate)


def _low_codecs(spec: CodecSpec) -> tuple[IntCodec, IntCodec]:
    """lo<L>'s codecs for the demoted tokens: the spec's integer codecs at 2 bits."""
    return (
        IntCodec(2, spec.group_size, spec.key_axis, spec.rotate, spec.params8, _levels(spec, "k")),
        IntCodec(2, spec.group_size, "token", spec.rotate, spec.params8, _levels(spec, "v")),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise CodecError(f"unsupported KV dtype {dtype}; expected float16, bfloat16 or float32")
    return name


def _check_layers(layers: Layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Squeeze a batch dim of 1 and check that every K and V has one shape, dtype and device."""
    if not isinstance(layers, Sequence) or not layers:
        raise CodecError("layers must be a non-empty sequence of (K, V) pairs")
    out = []
    for i, pair in enumerate(layers):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise CodecError(f"layer {i}: expected a (K, V) pair")
        kv = []
        for name, t in zip("KV", pair, strict=True):
            if not isinstance(t, torch.Tensor):
                raise CodecError(f"layer {i} {name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() == 4 and t.shape[0] == 1:
                t = t[0]
            if t.dim() != 3:
                raise CodecError(
                    f"layer {i} {name}: shape {tuple(t.shape)}; expected (kv_heads, tokens, head_dim)"
                    " or (1, kv_heads, tokens, head_dim)"
                )
            kv.append(t)
        out.append((kv[0], kv[1]))
    ref = out[0][0]
    for i, (k, v) in enumerate(out):
        for name, t in (("K", k), ("V", v)):
            if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise CodecError(
                    f"layer {i} {name}: {tuple(t.shape)} {t.dtype} on {t.device} differs from layer 0 K:"
                    f" {tuple(ref.shape)} {ref.dtype} on {ref.device}"
                )
    return out


def _check_scores(
    scores: Sequence[torch.Tensor] | None, n_layers: int, h: int, n: int, device: torch.device
) -> torch.Tensor | None:
    """Per-layer (kv_heads, tokens) scores -> one (n_layers * kv_heads, tokens) float32 tensor."""
    if scores is None:
        return None
    if len(scores) != n_layers:
        raise CodecError(f"scores has {len(scores)} layers, the cache {n_layers}")
    out = []
    for i, s in enumerate(scores):
        if not isinstance(s, torch.Tensor):
            raise CodecError("scores must be tensors of shape (kv_heads, tokens)")
        s = s[0] if s.dim() == 3 and s.shape[0] == 1 else s
        if tuple(s.shape) != (h, n):
            raise CodecError(
                f"layer {i} scores have shape {tuple(s.shape)}, expected (kv_heads, tokens) = {(h, n)}"
            )
        out.append(s.to(device=device, dtype=torch.float32))
    return torch.cat(out)


def _encode_tensors(codec: TensorCodec, x: torch.Tensor) -> list[torch.Tensor]:
    """Encode one tensor kind (K or V) of every layer -> its sections, flat.

    x: (n_layers, kv_heads, tokens, head_dim). Stackable codecs encode all layers in one call, as
    one tensor of n_layers * kv_heads heads.
    """
    n_layers, h, t, d = x.shape
    if codec.stacks((h, t, d)):
        return list(codec.encode(x.reshape(n_layers * h, t, d)))
    per_layer = [codec.encode(layer) for layer in x.unbind(0)]
    return [torch.cat(parts) for parts in zip(*per_layer, strict=True)]


def _low_last(slots: torch.Tensor) -> torch.Tensor:
    """Per row of a (..., tokens) bool lo<L> mask, the token indices with the unmarked ones first
    and the marked ones last, each in position order (a stable sort: no host sync, unlike
    boolean indexing)."""
    return torch.argsort(slots.to(torch.int32), dim=-1, stable=True)


@dataclass
class _Encoded:
    """What one call of :func:`_encode_layers` produced for its layers."""

    sections: list[torch.Tensor]  # flat: the coded K and V parts, SINK, the LOW parts, HIGH
    mask: torch.Tensor | None  # (layers * kv_heads, n_tokens) bool keep mask
    low_mask: torch.Tensor | None  # (layers * kv_heads, kept) bool: which kept tokens are in LOW


def _encode_layers(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    spec: CodecSpec,
    start: int,
    seq_end: int | None,
    score: torch.Tensor | None,
    codecs: tuple[TensorCodec, TensorCodec],
    counts: tuple[int, int, int, int],
) -> _Encoded:
    """Evict and encode consecutive layers.

    counts: (kept, sink, high, low): of the ``kept`` tokens per head, the first ``sink`` go to
    fp16, the last ``high`` to 8 bits (hp<N>) and the ``low`` lowest-scored of the others to 2 bits
    (lo<L>).
    """
    kept, sink, high, low = counts
    n_layers, (h, n, d) = len(pairs), pairs[0][0].shape
    ks = torch.stack([k for k, _ in pairs]).view(n_layers * h, n, d)
    vs = torch.stack([v for _, v in pairs]).view(n_layers * h, n, d)
    mask = low_mask = None
    if spec.evicts:
        ranked = importance(ks, spec, start, score, seq_end)
        idx = keep_indices(ranked, kept)
        if spec.low:
            low_mask = low_slots(ranked, idx, low)
        ks, vs = gather_tokens(ks, idx), gather_tokens(vs, idx)
        mask = mask_from_indices(idx, n)
    mid = slice(sink, kept - high)
    k_mid, v_mid = ks[:, mid], vs[:, mid]
    low_parts: list[torch.Tensor] = []
    if low_mask is not None:  # coded tokens first, then the demoted ones, each in position order
        order = _low_last(low_mask[:, mid])
        k_mid, v_mid = gather_tokens(k_mid, order), gather_tokens(v_mid, order)
        q = k_mid.shape[1] - low
        low_k, low_v = _low_codecs(spec)
        low_parts = [
            *_encode_tensors(low_k, k_mid[:, q:].reshape(n_layers, h, low, d)),
            *_encode_tensors(low_v, v_mid[:, q:].reshape(n_layers, h, low, d)),
        ]
        k_mid, v_mid = k_mid[:, :q], v_mid[:, :q]
    ks, vs = ks.view(n_layers, h, kept, d), vs.view(n_layers, h, kept, d)
    sections = [
        *_encode_tensors(codecs[0], k_mid.view(n_layers, h, -1, d)),
        *_encode_tensors(codecs[1], v_mid.view(n_layers, h, -1, d)),
    ]
    if sink:  # per layer: fp16 K then V of the sink tokens
        sections.append(as_bytes(to_fp16(torch.stack([ks[:, :, :sink], vs[:, :, :sink]], dim=1))))
    sections += low_parts
    if spec.high:  # per layer: 8-bit K codes, K params, V codes, V params of the newest tokens
        parts: list[torch.Tensor] = []
        if high:
            for x in (ks, vs):
                parts += _high_codec(spec).encode(x[:, :, -high:].reshape(n_layers * h, high, d))
        sections.append(
            torch.cat([p.view(n_layers, -1) for p in parts], dim=1).view(-1)
            if parts
            else ks.new_empty(0, dtype=torch.uint8)
        )
    return _Encoded(sections, mask, low_mask)


def encode_block(
    layers: Layers,
    spec: CodecSpec | str,
    *,
    start: int = 0,
    scores: Sequence[torch.Tensor] | None = None,
    seq_end: int | None = None,
) -> bytes:
    """Encode the KV of one block of tokens.

    Args:
        layers: per layer (K, V), each (kv_heads, tokens, head_dim) or (1, kv_heads, tokens,
            head_dim); float16, bfloat16 or float32; all on one device.
        spec: a CodecSpec or spec string.
        start: absolute position of the block's first token (sink tokens are positions < sink).
        scores: optional per layer (kv_heads, tokens) importance for eviction (higher = keep);
            None: the key-norm proxy. Ignored without eviction.
        seq_end: absolute end of the sequence when this segment is sealed: keep<P> always keeps
            positions >= ``seq_end - r<N>``, and hp<N> stores positions >= ``seq_end - N`` at 8
            bits (None: ``start + tokens``, the block ends the sequence). Ignored by the other
            codecs (pe/adapt keep the block's own last tokens).
    Returns:
        The payload (format.py); ``len()`` counts every byte.
    Raises:
        CodecError: bad shapes, dtypes, dims out of bounds, values a lossy codec cannot represent.
    """
    spec = CodecSpec.parse(spec) if isinstance(spec, str) else spec
    pairs = _check_layers(layers)
    h, n, d = pairs[0][0].shape
    n_layers = len(pairs)
    dtype = _dtype_name(pairs[0][0].dtype)
    check_dims(n_layers, h, d, n, start, CodecError)
    if spec.up_layers and spec.up_layers[-1] >= n_layers:
        raise CodecError(f"{spec}: up<layers> names layer {spec.up_layers[-1]} of a {n_layers}-layer cache")
    if spec.rope_theta:  # keys before RoPE, float32 (the key codecs work in float32 anyway)
        token_positions = torch.arange(start, start + n, device=pairs[0][0].device)
        pairs = [(remove_rope(k.float(), token_positions, spec.rope_theta), v) for k, v in pairs]
    if seq_end is not None and seq_end < start + n:
        raise CodecError(f"seq_end {seq_end} is before the block's end {start + n}")
    kept = spec.kept_tokens(n, start, seq_end)
    score = _check_scores(scores if spec.evicts else None, n_layers, h, n, pairs[0][0].device)
    sink = spec.fp16_sink_tokens(n, start)
    high = spec.high_tokens(n, start, seq_end)
    low = spec.low_tokens(n, start, seq_end)
    expected = section_sizes(spec, n_layers, h, d, n, start, dtype, kept, high, low)

    # Layers go together, as layers * kv_heads heads (eviction and codecs work per head), up to
    # _STACK_ELEMENTS per call: many small calls cost more than the work of small blocks, and
    # whole-block temporaries of big blocks fall out of cache. A call never spans two bit widths.
    per_call = max(1, _STACK_ELEMENTS // (h * n * d))
    calls = [
        _encode_layers(
            pairs[i : min(i + per_call, end)],
            spec,
            start,
            seq_end,
            None if score is None else score[i * h : min(i + per_call, end) * h],
            _codecs(spec, pairs[0][0].dtype, first),
            (kept, sink, high, low),
        )
        for first, end in _layer_runs(spec, range(n_layers))
        for i in range(first, end, per_call)
    ]
    sections = [
        torch.cat(parts) if len(parts) > 1 else parts[0]
        for parts in zip(*(c.sections for c in calls), strict=True)
    ]
    if spec.low:  # the four LOW parts (each of every layer) make one section, then its mask
        at = 4 + bool(sink)
        sections[at : at + 4] = [
            torch.cat(sections[at : at + 4]),
            pack_bits(torch.cat([c.low_mask for c in calls if c.low_mask is not None]), 1),
        ]
    if spec.evicts:
        sections.append(pack_bits(torch.cat([c.mask for c in calls if c.mask is not None]), 1))

    sizes = [p.numel() for p in sections]
    if sizes != [size for _, size in expected]:  # a codec broke the format's arithmetic: a bug, not input
        raise RuntimeError(f"section sizes {sizes} differ from the format's {expected}")
    body = torch.cat(sections).cpu().numpy().data.cast("B")
    table, chunks, offset = [], [], 0
    for (kind, _), size in zip(expected, sizes, strict=True):
        raw = body[offset : offset + size]
        offset += size
        # read_header counts the masks' bits and derives hp<N>'s count from the HIGH length
        counted = (kind == Section.MASK and spec.eviction == "keep") or kind in (
            Section.HIGH,
            Section.LOW_MASK,
        )
        packed = compress(raw) if (spec.entropy or spec.kind == "lossless") and not counted else None
        table.append(
            (kind, FLAG_ZSTD if packed is not None else 0, len(packed if packed is not None else raw))
        )
        chunks.append(packed if packed is not None else raw)
    return b"".join([pack_header(spec, n_layers, h, d, n, start, dtype, table), *chunks])


def _section_tensor(data: bytes | memoryview, device: torch.device) -> torch.Tensor:
    """A uint8 tensor on ``device`` holding a copy of ``data`` (never aliasing the payload)."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    with warnings.catch_warnings():  # frombuffer warns on read-only buffers; we copy right away
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).to(device, copy=True)


_QUANT_PARTS = {Section.K_DATA: 0, Section.K_PARAMS: 1, Section.V_DATA: 2, Section.V_PARAMS: 3}


def _layer_split(hdr: BlockHeader, kind: Section, size: int) -> list[list[int]] | None:
    """How a section's raw bytes split by layer: per part (LOW holds four, each of every layer),
    each layer's bytes in layer order. None for the bit masks, sliced after unpacking."""
    spec, n, h, d = hdr.spec, hdr.n_layers, hdr.kv_heads, hdr.head_dim
    if kind in (Section.MASK, Section.LOW_MASK):
        return None
    if kind == Section.LOW:
        return [[part] * n for part in quant_part_sizes(spec, h, d, hdr.low_tokens, 2, 2)]
    if spec.kind == "quant" and kind in _QUANT_PARTS:  # up<layers>: each layer at its bits
        sink = spec.fp16_sink_tokens(hdr.n_tokens, hdr.start)
        coded = hdr.kept_tokens - sink - hdr.high_tokens - hdr.low_tokens
        return [
            [quant_part_sizes(spec, h, d, coded, *spec.layer_bits(i))[_QUANT_PARTS[kind]] for i in range(n)]
        ]
    return [[size // n] * n]


@dataclass
class _Parsed:
    """A payload's header and its sections on the host, inflated (zstd) once, not yet decoded."""

    hdr: BlockHeader
    raw: list[memoryview]  # per section, in the header's order
    splits: list[list[list[int]] | None]  # per section, :func:`_layer_split`

    def layer_range(self, layers: slice | None) -> range:
        """The layers a ``layers`` slice selects from this block (all for None)."""
        if layers is None:
            return range(self.hdr.n_layers)
        chosen = range(self.hdr.n_layers)[layers]
        if not chosen or chosen.step != 1:
            raise CodecError(f"layers {layers} selects no consecutive layers of {self.hdr.n_layers}")
        return chosen

    def on_device(self, layers: range, target: torch.device) -> _Layers:
        """Copy the bytes of ``layers`` of every section to ``target`` (the masks whole)."""
        sections = []
        for data, split in zip(self.raw, self.splits, strict=True):
            if split is None or len(layers) == self.hdr.n_layers:
                sections.append(_section_tensor(data, target))
                continue
            pieces, at = [], 0
            for sizes in split:  # per part: the bytes of the chosen layers
                first = at + sum(sizes[: layers.start])
                pieces.append(data[first : first + sum(sizes[layers.start : layers.stop])])
                at += sum(sizes)
            sections.append(_section_tensor(pieces[0] if len(pieces) == 1 else b"".join(pieces), target))
        return _Layers(self.hdr, layers, sections)


@dataclass
class _Layers:
    """Consecutive layers of one block on the device: each section holds only their bytes (as a
    block of just these layers would), except the bit masks, which hold every layer's."""

    hdr: BlockHeader
    layers: range
    sections: list[torch.Tensor]  # flat uint8, in the header's order

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def sink(self) -> int:
        """Leading tokens stored in fp16."""
        return self.hdr.spec.fp16_sink_tokens(self.hdr.n_tokens, self.hdr.start)

    def mask(self, kind: Section, per_layer: int) -> torch.Tensor:
        """A bit mask section unpacked to (n_layers, kv_heads, per_layer // kv_heads) of these
        layers; ``per_layer``: its bits per layer."""
        bits = unpack_bits(self.sections[self.kinds.index(kind)], 1, self.hdr.n_layers * per_layer)
        return bits.view(self.hdr.n_layers, self.hdr.kv_heads, -1)[self.layers.start : self.layers.stop]

    @property
    def kinds(self) -> list[Section]:
        return [kind for kind, *_ in self.hdr.sections]

    @property
    def run_key(self) -> tuple[object, ...]:
        """Blocks with equal keys decode together."""
        h = self.hdr
        return (
            h.spec,
            h.n_layers,
            self.layers,
            h.kv_heads,
            h.head_dim,
            h.n_tokens,
            h.kept_tokens,
            h.high_tokens,
            h.low_tokens,
            h.dtype,
            self.sink,
        )


def _parse(payload: bytes | bytearray | memoryview) -> _Parsed:
    hdr = read_header(payload)
    expected = section_sizes(
        hdr.spec,
        hdr.n_layers,
        hdr.kv_heads,
        hdr.head_dim,
        hdr.n_tokens,
        hdr.start,
        hdr.dtype,
        hdr.kept_tokens,
        hdr.high_tokens,
        hdr.low_tokens,
    )
    view = memoryview(payload).cast("B")
    raw, splits = [], []
    for (kind, flags, offset, length), (_, raw_size) in zip(hdr.sections, expected, strict=True):
        data = view[offset : offset + length]
        raw.append(memoryview(decompress(data, raw_size)) if flags & FLAG_ZSTD else data)
        splits.append(_layer_split(hdr, kind, raw_size))
    return _Parsed(hdr, raw, splits)


def _positions(block: _Layers, target: torch.device) -> list[torch.Tensor]:
    """Per layer (kv_heads, kept) absolute positions of the kept tokens, from the keep mask."""
    hdr = block.hdr
    n_layers, h, n, kept = block.n_layers, hdr.kv_heads, hdr.n_tokens, hdr.kept_tokens
    all_pos = torch.arange(hdr.start, hdr.start + n, device=target)
    if not hdr.spec.evicts:
        return [all_pos.expand(h, n)] * n_layers
    mask = block.mask(Section.MASK, h * n).bool()
    if not bool((mask.sum(dim=-1) == kept).all()):
        raise FormatError(f"eviction mask does not keep exactly {kept} tokens per head")
    return list(all_pos.expand(n_layers, h, n)[mask].view(n_layers, h, kept).unbind(0))


def _decode_tensors(
    codec: TensorCodec,
    parts: list[list[torch.Tensor]],
    n_layers: int,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decode one tensor kind (K or V) of a run of blocks -> (blocks, n_layers, *shape).

    parts: per block, the flat sections of this kind. Stackable codecs decode the whole run as one
    tensor of blocks * n_layers * kv_heads heads; the others layer by layer.
    """
    h, t, d = shape
    if codec.stacks(shape):
        joined = [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts, strict=True)]
        return codec.decode(joined, (len(parts) * n_layers * h, t, d), dtype).view(
            len(parts), n_layers, h, t, d
        )
    layers = [
        codec.decode(
            [p.narrow(0, i * (p.numel() // n_layers), p.numel() // n_layers) for p in block], shape, dtype
        )
        for block in parts
        for i in range(n_layers)
    ]
    return torch.stack(layers).view(len(parts), n_layers, h, t, d)


def _decode_high(
    spec: CodecSpec, sections: list[torch.Tensor], hdr: BlockHeader, n_layers: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The HIGH sections of ``n_layers`` layers of a run of blocks -> K and V of their newest
    tokens, each (blocks, n_layers, kv_heads, high, head_dim)."""
    h, t, d = hdr.kv_heads, hdr.high_tokens, hdr.head_dim
    codes_n = h * t * d
    params_n = (high_token_nbytes(spec, d) // 2 - d) * h * t
    per_layer = torch.stack(sections).view(len(sections) * n_layers, 2, codes_n + params_n)
    codec, shape = _high_codec(spec), (len(sections) * n_layers * h, t, d)
    k, v = (
        codec.decode(
            [per_layer[:, i, :codes_n].reshape(-1), per_layer[:, i, codes_n:].reshape(-1)], shape, dtype
        ).view(len(sections), n_layers, h, t, d)
        for i in (0, 1)
    )
    return k, v


def _merge_low(
    coded: tuple[torch.Tensor, torch.Tensor], run: list[_Layers], kinds: list[Section], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """lo<L>: decode the LOW sections of a run and put their tokens between the coded ones, where
    each LOW_MASK says -> K and V, each (blocks, n_layers, kv_heads, kept - sink - high, head_dim).

    coded: K and V of the other tokens past the sink and before the 8-bit ones.
    """
    hdr, sink, n_layers = run[0].hdr, run[0].sink, run[0].n_layers
    spec, h, d, kept, low = (
        hdr.spec,
        hdr.kv_heads,
        hdr.head_dim,
        hdr.kept_tokens,
        hdr.low_tokens,
    )
    sizes = [n_layers * size for size in quant_part_sizes(spec, h, d, low, 2, 2)]
    parts = [list(b.sections[kinds.index(Section.LOW)].split(sizes)) for b in run]
    low_k, low_v = _low_codecs(spec)
    shape = (h, low, d)
    k_low = _decode_tensors(low_k, [p[:2] for p in parts], n_layers, shape, dtype)
    v_low = _decode_tensors(low_v, [p[2:] for p in parts], n_layers, shape, dtype)
    slots = torch.stack([b.mask(Section.LOW_MASK, h * kept) for b in run]).bool()
    mid = slots[..., sink : kept - hdr.high_tokens]
    if not bool((mid.sum(dim=-1) == low).all() & (mid.sum() == slots.sum())):  # one host sync
        raise FormatError(f"LOW_MASK does not mark exactly {low} coded tokens per head")
    source = torch.argsort(_low_last(mid), dim=-1)  # per slot: its token among coded, then demoted
    k, v = (
        gather_tokens(torch.cat([main, demoted], dim=-2), source)
        for main, demoted in zip(coded, (k_low, v_low), strict=True)
    )
    return k, v


def _decode_coded(
    run: list[_Layers], n_coded: int, shape: tuple[int, int, int], orig: torch.dtype, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the coded sections (the first ``n_coded``) of a run of blocks, each (blocks,
    n_layers, *shape): every run of layers at one bit width (up<layers>) decoded together."""
    spec = run[0].hdr.spec
    n_key = n_coded // 2
    offsets = [0] * n_coded
    ks, vs = [], []
    for first, end in _layer_runs(spec, run[0].layers):
        key_codec, value_codec = _codecs(spec, orig, first)
        if spec.kind == "quant":  # the run's bytes of each part, at its bits
            sizes = [
                (end - first) * size
                for size in quant_part_sizes(spec, *shape[::2], shape[1], *spec.layer_bits(first))
            ]
        else:
            sizes = [b.numel() for b in run[0].sections[:n_coded]]
        parts = [
            [s.narrow(0, o, z) for s, o, z in zip(b.sections[:n_coded], offsets, sizes, strict=True)]
            for b in run
        ]
        offsets = [o + z for o, z in zip(offsets, sizes, strict=True)]
        ks.append(_decode_tensors(key_codec, [p[:n_key] for p in parts], end - first, shape, dtype))
        vs.append(_decode_tensors(value_codec, [p[n_key:] for p in parts], end - first, shape, dtype))
    if len(ks) == 1:
        return ks[0], vs[0]
    return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def _decode_run(run: list[_Layers], target: torch.device, dtype: torch.dtype | None) -> list[DecodedBlock]:
    """Decode blocks of one run key together."""
    hdr, sink, n_layers = run[0].hdr, run[0].sink, run[0].n_layers
    spec, h, d, kept = hdr.spec, hdr.kv_heads, hdr.head_dim, hdr.kept_tokens
    orig_dtype = getattr(torch, hdr.dtype)
    final_dtype = dtype or orig_dtype
    out_dtype = torch.float32 if spec.rope_theta else final_dtype  # pr<T>: RoPE goes back on in float32
    kinds = run[0].kinds
    n_key = sum(1 for kind in kinds if kind in (Section.K_DATA, Section.K_PARAMS))
    n_value = sum(1 for kind in kinds if kind in (Section.V_DATA, Section.V_PARAMS))
    high = hdr.high_tokens
    shape = (h, kept - sink - high - hdr.low_tokens, d)
    k, v = _decode_coded(run, n_key + n_value, shape, orig_dtype, out_dtype)
    if spec.low:
        k, v = _merge_low((k, v), run, kinds, out_dtype)
    if high:  # per block, per layer: 8-bit K codes, K params, V codes, V params; after the coded ones
        k_high, v_high = _decode_high(
            spec, [b.sections[kinds.index(Section.HIGH)] for b in run], hdr, n_layers, out_dtype
        )
        k = torch.cat([k, k_high], dim=3)
        v = torch.cat([v, v_high], dim=3)
    if sink:  # per block, per layer: fp16 K then V of the sink tokens, ahead of the coded ones
        sinks = torch.stack([b.sections[n_key + n_value] for b in run]).view(torch.float16)
        sinks = sinks.view(len(run), n_layers, 2, h, sink, d).to(out_dtype)
        k = torch.cat([sinks[:, :, 0], k], dim=3)
        v = torch.cat([sinks[:, :, 1], v], dim=3)
    positions = [_positions(block, target) for block in run]
    if spec.rope_theta:  # RoPE back on, at each kept token's absolute position
        at = torch.stack([torch.stack(p) for p in positions])
        k, v = apply_rope(k, at, spec.rope_theta).to(final_dtype), v.to(final_dtype)
    return [
        DecodedBlock(
            [(k[j, i], v[j, i]) for i in range(n_layers)],
            positions[j],
            block.hdr.n_tokens,
            block.hdr.start,
            spec,
            block.hdr.dtype,
        )
        for j, block in enumerate(run)
    ]


class BlockDecoder:
    """Payloads parsed once (headers read, zstd sections inflated on the host), then decoded a
    range of layers at a time: a loader that scatters layer by layer into a paged cache copies
    and decodes each layer's bytes once, not every layer's per layer.

    ``decode(slice(i, j))`` is bit for bit what ``decode()`` gives for layers i..j-1. Sections
    stored without zstd stay views of the payloads: keep them valid (a shared-memory mapping open)
    until the last ``decode``.
    """

    def __init__(
        self,
        payloads: Sequence[bytes | bytearray | memoryview],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Raises FormatError: malformed payload (see ``read_header``), or a corrupt zstd section."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self._parsed = [_parse(p) for p in payloads]

    @property
    def n_layers(self) -> int:
        """Layers of the first block (0 without payloads)."""
        return self._parsed[0].hdr.n_layers if self._parsed else 0

    def decode(self, layers: slice | None = None) -> list[DecodedBlock]:
        """One :class:`DecodedBlock` per payload holding the layers ``layers`` selects (consecutive;
        None: all), e.g. ``slice(3, 4)`` for layer 3 alone; ``.layers[0]`` is then layer 3.

        Raises:
            CodecError: ``layers`` selects no consecutive layers of a block.
            FormatError: a corrupt mask of the selected layers.
        """
        chosen = [b.on_device(b.layer_range(layers), self.device) for b in self._parsed]
        out: list[DecodedBlock] = []
        for _, run in itertools.groupby(chosen, key=lambda b: b.run_key):
            blocks = list(run)
            hdr = blocks[0].hdr
            # Bounded runs: one call's sections, outputs and (for codecs that do not chunk their
            # own calls, fp8) float32 temporaries stay within a few times _RUN_ELEMENTS.
            per_run = max(
                1, _RUN_ELEMENTS // max(1, blocks[0].n_layers * hdr.kv_heads * hdr.kept_tokens * hdr.head_dim)
            )
            for i in range(0, len(blocks), per_run):
                out.extend(_decode_run(blocks[i : i + per_run], self.device, self.dtype))
        return out


def decode_blocks(
    payloads: Sequence[bytes | bytearray | memoryview],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    layers: slice | None = None,
) -> list[DecodedBlock]:
    """Decode payloads from :func:`encode_block`, e.g. the segments of a snapshot, one
    :class:`DecodedBlock` each. Consecutive blocks of one codec and shape decode together, all
    layers at once: a 2048-token cache in 64-token blocks takes a few dozen torch calls, not
    thousands (their per-call cost dominated small blocks).

    Args:
        payloads: the block bytes.
        device: where the tensors go (default CPU).
        dtype: output dtype (default: the original dtype of the encoded tensors).
        layers: only these consecutive layers (a slice of layer indices; default all): only their
            bytes are copied and decoded, bit for bit as in the full decode. To decode several
            ranges of the same payloads, :class:`BlockDecoder` parses them once.
    Raises:
        FormatError: malformed payload (see ``read_header``), or a corrupt zstd section.
        CodecError: ``layers`` selects no consecutive layers.
    """
    return BlockDecoder(payloads, device=device, dtype=dtype).decode(layers)


def decode_block(
    payload: bytes | bytearray | memoryview,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    layers: slice | None = None,
) -> DecodedBlock:
    """Decode one payload from :func:`encode_block` (see :func:`decode_blocks`)."""
    return decode_blocks([payload], device=device, dtype=dtype, layers=layers)[0]
