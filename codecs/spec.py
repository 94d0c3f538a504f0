"""Codec specs: a short string names every parameter that changes the encoded bytes.

Grammar (``-``-separated, options in any order, each at most once)::

    base      fp16 | lossless | fp8 | k{8,4,3,2}v{8,4,3,2} (3-bit codes: block format version 2)
    g<N>      group size in elements (power of two, 8..1024; default 64)
    kc | kt   key grouping axis for kXvY: per channel over tokens (KIVI) or per token over head_dim
    nr        kXvY: no Hadamard rotation of keys and values (for measurement; rotation is the default)
    p8        kXvY: scales and zero-points as 8-bit codes on per-head grids (params.py) instead of
              fp16 pairs: about half the parameter bytes
    nf        kXvY: 2- and 4-bit codes index non-uniform levels fitted to rotated KV (codebook.py)
              instead of uniform ones; same bytes (block format version 2)
    pr<T>     kXvY: keys quantized before RoPE (rope.py): the codec removes the rotary embedding of
              theta T (the model's rope_theta, "half" layout) at each token's absolute position and
              puts it back on decode (block format version 3)
    up<L.M..> k2/k3 keys and v2/v3 values: the listed layers (0-based, ascending, dot-separated)
              take one more bit for keys and for values (k3v2 -> k4v3 there): per-layer mixed
              precision, the layers chosen by a calibration (``codecs/data/calibration-*.json``,
              ``bench/quality_calibrate.py``) (block format version 3)
    z         zstd entropy stage over the encoded sections (implied by, and not allowed with, lossless)
    sink<N>   fp8/kXvY: the first N absolute positions are stored in fp16 instead
    hp<N>     kXvY: the newest N tokens of the sequence (absolute positions >= seq_end - N) take
              8-bit keys and values (per-token groups); with keep<P>, N <= r<N>
    pe<X>     eviction, preserve-early: the first X% of the block's tokens are always kept
    adapt<X>  eviction, adaptive: same budget as pe<X>, every token eligible by score
    keep<P>   eviction, exact budget: keep P% (1..100) of each block's tokens, chosen by score
    lo<L>     kXvY with keep<P>: of the tokens keep<P> keeps, the lowest-scored, L% of the block's
              tokens before the recent window (L <= P), take 2-bit keys and values instead
    r<N>      eviction: the recent window of N tokens is always kept (default 16); for pe/adapt the
              last N tokens of the block, for keep<P> the last N tokens of the sequence

Eviction budget (both policies): a block of n tokens keeps ``ceil(n * (100 + X) / 200)`` tokens,
i.e. X% of the tokens plus half of the rest, never fewer than the tokens it must keep (the sink:
absolute positions < max(4, sink N); the recent window; for pe<X> the first ``ceil(n * X / 100)``
tokens). This fits the report's Adapt ratios (Adapt30 9.5x = 6.2x / 0.65) and roughly its PE
ratios (its PE kept slightly fewer tokens; we use one budget for both so they compare at equal
size). Evicted tokens are absent from the decoded block; positions say which were kept.
"The block" is what one ``encode_block`` call gets (a store segment): eviction is decided when a
block is sealed, from that block alone, so blocks stay immutable and dedup keeps working; pe<X>
preserves the early part of each block (of the whole sequence when it is encoded as one block).

keep<P> budget: the tokens at absolute positions >= ``seq_end - N`` (r<N>, the recent window),
where ``seq_end`` is the end of the sequence when the segment is sealed (``encode_block(...,
seq_end=)``; default: the block's own end), are all kept; of the block's other m tokens
``ceil(m * P / 100)`` are kept, raised only to the sink (absolute positions < max(4, sink N)). So
every block wholly before the recent window keeps exactly P%, whatever the sequence that follows
it, and the block the window starts in still keeps P% of its older tokens (until 2026-11 it kept
only the window's tokens there when those outnumbered P% of the block: a hole just before the
window). The kept count is read back from the block's keep mask (format.py), so blocks sealed
under either rule decode.
This is the benchmark's dedup-safe frontier (docs/results/quality_levers.md): at equal ratio it
beats pe<X>/adapt<X>, whose half-of-the-rest budget cannot go below 50%.

hp<N>: the newest tokens draw most of the attention of the tokens that follow, so their
quantization error costs the most: on SmolLM2 the newest 16 at 8 bits cut
``k4v4-sink4-z-keep88-r16``'s KL from 0.0024 to 0.0016 for 3.6% of the ratio. Like keep<P>'s
recent window, it depends on where the sequence ended when the segment was sealed, so only the
segments under the window differ between sessions; the count is read back from the length of
their 8-bit section (format.py).

lo<L>: a token just below the eviction cut may still be needed (a name copied once from far back),
and dropping it then costs far more than storing it coarsely. On SmolLM2 prose
``k4v4-p8-sink4-z-keep88-lo72-r32`` (16% of the older tokens at 4 bits, 72% at 2 bits, 12% dropped)
measured 6.43x at KL 0.0215 where dropping alone gave 6.01x at 0.027; it trades the rare large miss
for a uniformly coarser cache (top-1 0.916 against 0.951), and on a copy-heavy changelog it loses
to dropping at that ratio (docs/results/quality_levers.md). MiKV (Yang et al. 2024) keeps evicted
tokens at low precision the same way. Of a block's m tokens before the recent window,
``min(ceil(m * L / 100), kept - forced)`` are demoted, chosen by the same ranking as eviction: the
lowest-scored of the kept ones (never the sink or the recent window). The 2-bit tokens use the
spec's group size, key axis, rotation and p8; a second mask over the kept tokens says which they
are, and its bits give their count (format.py).

Key axis: kc is the default because on real SmolLM2 KV (rotated keys) it measured a relative
key error of 0.049 vs 0.085 for kt at 4 bits and 0.25 vs 0.43 at 2 bits, and k4v4 next-token
KL 0.012 vs 0.016 (``tests/codecs/test_real_kv.py`` keeps the first comparison honest).

``canonical()`` spells every parameter out, so a spec string in a hash or a header never changes
meaning when a default changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from deltastore.errors import InvalidArgument

__all__ = ["EVICTION_SINK", "TIERS", "CodecSpec", "Tier"]

Kind = Literal["fp16", "lossless", "fp8", "quant"]
KeyAxis = Literal["channel", "token"]
Eviction = Literal["none", "pe", "adapt", "keep"]

EVICTION_SINK = 4
"""Absolute positions below this are never evicted (attention sinks, Xiao et al. 2023)."""

DEFAULT_GROUP = 64
DEFAULT_RECENT = 16
DEFAULT_KEY_AXIS: KeyAxis = "channel"
_BITS = (2, 3, 4, 8)
_MAX_SINK = 1024
_MAX_RECENT = 1 << 20

_OPTION = re.compile(r"^(g|sink|pe|adapt|keep|lo|r|hp)(\d{1,7})$|^(pr)(\d{1,10})$")
_MAX_THETA = 10**10
_UP = re.compile(r"^up(\d{1,4}(?:\.\d{1,4})*)$")


@dataclass(frozen=True)
class CodecSpec:
    """One codec configuration. Build with :meth:`parse`; fields are validated on construction.

    Attributes:
        kind: "fp16" (raw), "lossless" (bit-exact byte planes + zstd), "fp8" (e4m3, per-group
            scale), "quant" (asymmetric integer codes with fp16 scale and zero-point per group).
        key_bits / value_bits: bits per stored element (16 for fp16/lossless, 8 for fp8).
        group_size: elements per scale group (fp8 and quant).
        key_axis: quant keys grouped per "channel" (along tokens, KIVI) or per "token" (along
            head_dim). Values are always grouped per token.
        rotate: quant keys and values are rotated along head_dim by a normalized, sign-randomized
            Walsh-Hadamard matrix before quantization (on SmolLM2 it cuts k4v2's KL by ~40%).
        params8: quant scales and zero-points stored as 8-bit codes (``params.py``).
        nf: quant 2- and 4-bit codes index non-uniform levels (``codebook.py``).
        rope_theta: quant: keys are quantized before RoPE of this theta (``rope.py``); 0: as given.
        up_layers: quant: layers whose keys and values take one more bit (ascending).
        entropy: sections go through zstd (always for lossless).
        sink: first absolute positions stored in fp16 (fp8 and quant).
        high: quant: the newest ``high`` tokens of the sequence take 8-bit keys and values.
        low: quant with keep<P>: the percentage of a block's older tokens demoted to 2 bits (lo<L>).
        eviction / evict_pct / recent: see the module docstring.
    """

    kind: Kind
    key_bits: int = 16
    value_bits: int = 16
    group_size: int = DEFAULT_GROUP
    key_axis: KeyAxis = DEFAULT_KEY_AXIS
    rotate: bool = True
    params8: bool = False
    nf: bool = False
    rope_theta: int = 0
    up_layers: tuple[int, ...] = ()
    entropy: bool = False
    sink: int = 0
    high: int = 0
    low: int = 0
    eviction: Eviction = "none"
    evict_pct: int = 0
    recent: int = DEFAULT_RECENT

    def __post_init__(self) -> None:
        bits = {"fp16": (16,), "lossless": (16,), "fp8": (8,), "quant": _BITS}.get(self.kind)
        if bits is None:
            raise InvalidArgument(f"unknown codec kind {self.kind!r}")
        if self.key_bits not in bits or self.value_bits not in bits:
            raise InvalidArgument(f"{self.kind}: bits must be one of {bits}")
        g = self.group_size
        if g < 8 or g > 1024 or g & (g - 1):
            raise InvalidArgument(f"group size {g} must be a power of two in [8, 1024]")
        if not 0 <= self.sink <= _MAX_SINK:
            raise InvalidArgument(f"sink {self.sink} must be in [0, {_MAX_SINK}]")
        if self.sink and self.kind in ("fp16", "lossless"):
            raise InvalidArgument(f"sink<N> has no meaning for {self.kind}: every token is stored exactly")
        if self.entropy and self.kind == "lossless":
            raise InvalidArgument("lossless always uses zstd: drop the 'z' option")
        if self.eviction not in ("none", "pe", "adapt", "keep"):
            raise InvalidArgument(f"unknown eviction policy {self.eviction!r}")
        if self.eviction == "keep" and not 1 <= self.evict_pct <= 100:
            raise InvalidArgument(f"keep percentage {self.evict_pct} must be in [1, 100]")
        if self.eviction in ("pe", "adapt") and not 0 <= self.evict_pct < 100:
            raise InvalidArgument(f"eviction percentage {self.evict_pct} must be in [0, 100)")
        if not 0 <= self.recent <= _MAX_RECENT:
            raise InvalidArgument(f"recent window {self.recent} must be in [0, {_MAX_RECENT}]")
        if (self.params8 or self.high or self.nf or self.rope_theta) and self.kind != "quant":
            raise InvalidArgument("p8, nf, pr<T> and hp<N> apply to kXvY codecs only")
        if self.up_layers:
            if self.kind != "quant" or self.key_bits not in (2, 3) or self.value_bits not in (2, 3):
                raise InvalidArgument("up<layers> needs 2- or 3-bit keys and values (kXvY, X and Y in 2..3)")
            if list(self.up_layers) != sorted(set(self.up_layers)):
                raise InvalidArgument(f"up<layers>: {self.up_layers} must be ascending without repeats")
        if not 0 <= self.rope_theta <= _MAX_THETA:
            raise InvalidArgument(f"pr<T>: theta {self.rope_theta} must be in [1, {_MAX_THETA}]")
        if self.nf and self.key_bits == self.value_bits == 8:
            raise InvalidArgument("nf has no meaning for k8v8: 8-bit codes stay uniform")
        if self.high:
            if not 0 < self.high <= _MAX_RECENT:
                raise InvalidArgument(f"hp<N>: N={self.high} must be in [1, {_MAX_RECENT}]")
            if self.key_bits == self.value_bits == 8:
                raise InvalidArgument("hp<N> has no meaning for k8v8: every token is already 8-bit")
            if self.eviction in ("pe", "adapt"):
                raise InvalidArgument(
                    "hp<N> needs keep<P> (or no eviction): pe/adapt keep each block's own last tokens"
                )
            if self.eviction == "keep" and self.high > self.recent:
                raise InvalidArgument(
                    f"hp{self.high} exceeds the recent window r{self.recent}: the 8-bit tokens must be kept"
                )

        if self.low:
            if self.kind != "quant" or self.eviction != "keep":
                raise InvalidArgument("lo<L> needs a kXvY codec with keep<P>")
            if not 1 <= self.low <= self.evict_pct:
                raise InvalidArgument(
                    f"lo{self.low}: L must be in [1, P={self.evict_pct}]: only kept tokens are demoted"
                )
            if self.key_bits == self.value_bits == 2:
                raise InvalidArgument("lo<L> has no meaning for k2v2: every token is already 2-bit")

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse a spec string such as "k4v2-pe50" or "lossless"; raises InvalidArgument."""
        if not isinstance(text, str) or not text or len(text) > 128:
            raise InvalidArgument(f"codec spec must be a non-empty string of at most 128 chars, got {text!r}")
        base, *options = text.strip().lower().split("-")
        fields: dict[str, object] = {}
        if base in ("fp16", "lossless", "fp8"):
            fields["kind"] = base
            fields["key_bits"] = fields["value_bits"] = 8 if base == "fp8" else 16
        elif (m := re.fullmatch(r"k(\d)v(\d)", base)) is not None:
            fields.update(kind="quant", key_bits=int(m.group(1)), value_bits=int(m.group(2)))
        else:
            raise InvalidArgument(f"unknown codec {base!r} in {text!r}", hint="see `deltastore codecs`")
        seen: set[str] = set()
        for opt in options:
            m = _OPTION.fullmatch(opt)
            key = (m.group(1) or m.group(3)) if m else opt
            if (up := _UP.fullmatch(opt)) is not None:
                if "up" in seen:
                    raise InvalidArgument(f"option 'up' given twice in {text!r}")
                seen.add("up")
                fields["up_layers"] = tuple(int(x) for x in up.group(1).split("."))
                continue
            if key in ("pe", "adapt", "keep"):
                key = "eviction"
            if key in ("kc", "kt"):
                key = "axis"
            if key in seen:
                raise InvalidArgument(f"option {opt!r} given twice in {text!r}")
            seen.add(key)
            if opt in ("kc", "kt", "nr", "p8", "nf") and fields["kind"] != "quant":
                raise InvalidArgument(f"option {opt!r} applies to kXvY codecs only")
            if opt == "kc":
                fields["key_axis"] = "channel"
            elif opt == "kt":
                fields["key_axis"] = "token"
            elif opt == "nr":
                fields["rotate"] = False
            elif opt == "p8":
                fields["params8"] = True
            elif opt == "nf":
                fields["nf"] = True
            elif opt == "z":
                fields["entropy"] = True
            elif m is None:
                raise InvalidArgument(f"unknown option {opt!r} in {text!r}", hint="see `deltastore codecs`")
            elif m.group(3) == "pr":
                fields["rope_theta"] = int(m.group(4))
                if not fields["rope_theta"]:
                    raise InvalidArgument(f"pr<T>: theta must be at least 1 in {text!r}")
            elif m.group(1) == "g":
                fields["group_size"] = int(m.group(2))
            elif m.group(1) == "sink":
                fields["sink"] = int(m.group(2))
            elif m.group(1) == "r":
                fields["recent"] = int(m.group(2))
            elif m.group(1) == "hp":
                fields["high"] = int(m.group(2))
                if not fields["high"]:
                    raise InvalidArgument(f"hp<N>: N must be in [1, {_MAX_RECENT}] in {text!r}")
            elif m.group(1) == "lo":
                fields["low"] = int(m.group(2))
                if not fields["low"]:
                    raise InvalidArgument(f"lo<L>: L must be at least 1 in {text!r}")
            else:
                fields["eviction"] = m.group(1)
                fields["evict_pct"] = int(m.group(2))
        if "r" in seen and "eviction" not in seen:
            raise InvalidArgument(f"r<N> needs an eviction policy (pe<X>, adapt<X> or keep<P>) in {text!r}")
        if "g" in seen and fields["kind"] in ("fp16", "lossless"):
            raise InvalidArgument(f"g<N> has no meaning for {fields['kind']}")
        return cls(**fields)  # type: ignore[arg-type]

    def canonical(self) -> str:
        """The stable, fully explicit spec string (used in hashes and block headers)."""
        if self.kind == "quant":
            parts = [f"k{self.key_bits}v{self.value_bits}", f"g{self.group_size}"]
            parts.append("kc" if self.key_axis == "channel" else "kt")
            if not self.rotate:
                parts.append("nr")
            if self.params8:
                parts.append("p8")
            if self.nf:
                parts.append("nf")
            if self.rope_theta:
                parts.append(f"pr{self.rope_theta}")
            if self.up_layers:
                parts.append("up" + ".".join(map(str, self.up_layers)))
        elif self.kind == "fp8":
            parts = ["fp8", f"g{self.group_size}"]
        else:
            parts = [self.kind]
        if self.entropy:
            parts.append("z")
        if self.sink:
            parts.append(f"sink{self.sink}")
        if self.high:
            parts.append(f"hp{self.high}")
        if self.eviction != "none":
            parts.append(f"{self.eviction}{self.evict_pct}")
            if self.low:
                parts.append(f"lo{self.low}")
            parts.append(f"r{self.recent}")
        return "-".join(parts)

    def layer_bits(self, layer: int) -> tuple[int, int]:
        """(key bits, value bits) of ``layer``: one more for each in ``up_layers``."""
        extra = 1 if layer in self.up_layers else 0
        return self.key_bits + extra, self.value_bits + extra

    @property
    def name(self) -> str:
        """Same as :meth:`canonical`."""
        return self.canonical()

    @property
    def bit_exact(self) -> bool:
        """decode(encode(x)) is bit-identical to x for fp16, bf16 and fp32 input."""
        return self.kind == "lossless" and self.eviction == "none"

    @property
    def evicts(self) -> bool:
        return self.eviction != "none"

    @property
    def eviction_sink(self) -> int:
        """Absolute positions below this are never evicted."""
        return max(EVICTION_SINK, self.sink)

    def kept_tokens(self, n_tokens: int, start: int = 0, seq_end: int | None = None) -> int:
        """Tokens a block of ``n_tokens`` starting at absolute ``start`` keeps (same for every head).

        pe<X>/adapt<X>: the budget ``ceil(n * (100 + X) / 200)``, raised to the sink, the block's
        last ``recent`` tokens and, for pe<X>, the first ``ceil(n * X / 100)`` tokens.
        keep<P>: the tokens at positions >= ``seq_end - recent`` (``seq_end`` None: the block's
        end), plus ``ceil(m * P / 100)`` of the block's ``m`` other tokens, raised to the sink.
        ``seq_end`` is ignored by pe/adapt.
        """
        if not self.evicts:
            return n_tokens
        prefix, tail = self.forced_range(n_tokens, start, seq_end)
        if self.eviction == "keep":  # the tokens before the recent window keep their own P%
            return n_tokens - tail + max(-(-tail * self.evict_pct // 100), prefix)
        budget = -(-n_tokens * (100 + self.evict_pct) // 200)
        return max(budget, prefix + n_tokens - tail)

    def low_tokens(self, n_tokens: int, start: int = 0, seq_end: int | None = None) -> int:
        """Kept tokens of the block that lo<L> stores at 2 bits: ``ceil(m * L / 100)`` of the
        block's m tokens before the recent window, at most the kept ones that are not forced.

        Raises:
            InvalidArgument: ``seq_end`` is before the block's end.
        """
        prefix, tail = self.forced_range(n_tokens, start, seq_end)
        if not self.low:
            return 0
        return min(
            -(-tail * self.low // 100),
            self.kept_tokens(n_tokens, start, seq_end) - prefix - (n_tokens - tail),
        )

    def forced_range(self, n_tokens: int, start: int = 0, seq_end: int | None = None) -> tuple[int, int]:
        """(prefix, tail): block indices ``[0, prefix)`` and ``[tail, n_tokens)`` are always kept.

        Raises:
            InvalidArgument: ``seq_end`` is before the block's end.
        """
        end = start + n_tokens
        if seq_end is not None and self.eviction == "keep" and seq_end < end:
            raise InvalidArgument(f"seq_end {seq_end} is before the block's end {end}")
        if self.eviction == "keep":
            tail = min(max((end if seq_end is None else seq_end) - self.recent - start, 0), n_tokens)
        else:
            tail = n_tokens - min(self.recent, n_tokens)
        return min(self.forced_prefix(n_tokens, start), tail), tail

    def forced_prefix(self, n_tokens: int, start: int = 0) -> int:
        """Length of the block prefix that eviction always keeps (sink, plus pe<X>'s early part).

        For pe/adapt it never reaches into the block's recent window.
        """
        sink = min(max(self.eviction_sink - start, 0), n_tokens)
        early = -(-n_tokens * self.evict_pct // 100) if self.eviction == "pe" else 0
        if self.eviction == "keep":
            return sink
        return min(max(sink, early), n_tokens - min(self.recent, n_tokens))

    def fp16_sink_tokens(self, n_tokens: int, start: int = 0) -> int:
        """Leading tokens of the block stored in fp16 (absolute positions < sink)."""
        return min(max(self.sink - start, 0), n_tokens)

    def high_tokens(self, n_tokens: int, start: int = 0, seq_end: int | None = None) -> int:
        """Trailing tokens of the block that hp<N> stores at 8 bits: absolute positions >=
        ``seq_end - N`` (``seq_end`` None: the block's end) and >= the fp16 sink. All are kept
        (hp<N> is at most keep<P>'s recent window).

        Raises:
            InvalidArgument: ``seq_end`` is before the block's end.
        """
        end = start + n_tokens
        if seq_end is not None and seq_end < end:
            raise InvalidArgument(f"seq_end {seq_end} is before the block's end {end}")
        if not self.high:
            return 0
        first = max((end if seq_end is None else seq_end) - self.high, self.sink, start)
        return max(end - first, 0)

    def __str__(self) -> str:
        return self.canonical()


@dataclass(frozen=True)
class Tier:
    """A named operating point: what users pick, and what the report called it.

    Attributes:
        name: our honest name (the report's name kept where users will look for it).
        spec: the codec.
        about: one line saying what it is.
        report_ratio: the ratio the source report claims for it (None: not in the report).
    """

    name: str
    spec: CodecSpec
    about: str
    report_ratio: float | None = None


def _tier(name: str, spec: str, about: str, report_ratio: float | None = None) -> tuple[str, Tier]:
    return name, Tier(name, CodecSpec.parse(spec), about, report_ratio)


TIERS: dict[str, Tier] = dict(
    [
        _tier("fp16", "fp16", "raw fp16, the reference every ratio is taken against"),
        _tier("lossless", "lossless", "bit-exact: byte planes + zstd (fp16, bf16, fp32; NaN/inf/-0 kept)"),
        _tier("fp8", "fp8", "e4m3 with an fp16 scale per 64 elements"),
        _tier("k8v8", "k8v8", "8-bit keys and values, near-transparent"),
        _tier(
            "report-lossless (k4v4)",
            "k4v4",
            "the report's 'Lossless' tier: 4-bit keys and values, NOT bit-exact",
            4.1,
        ),
        _tier("conservative (k4v2)", "k4v2", "4-bit rotated keys, 2-bit values, no eviction", 6.2),
        _tier("k4v4-pe30", "k4v4-pe30", "k4v4, keep first 30% + half of the rest by score", 6.9),
        _tier("k4v4-pe10", "k4v4-pe10", "k4v4, keep first 10% + half of the rest by score", 7.9),
        _tier("k4v2-pe50", "k4v2-pe50", "k4v2, keep first 50% + half of the rest by score", 9.0),
        _tier("k4v2-adapt30", "k4v2-adapt30", "k4v2, keep 65% of tokens chosen by score", 9.5),
        _tier("balanced (k4v2-pe30)", "k4v2-pe30", "k4v2, keep first 30% + half of the rest by score", 10.2),
        _tier("k4v2-pe20", "k4v2-pe20", "k4v2, keep first 20% + half of the rest by score", 10.9),
        _tier("k4v2-adapt10", "k4v2-adapt10", "k4v2, keep 55% of tokens chosen by score", 11.1),
        _tier("k4v2-pe15", "k4v2-pe15", "k4v2, keep first 15% + half of the rest by score", 11.3),
        _tier(
            "aggressive (k4v2-pe10)", "k4v2-pe10", "k4v2, keep first 10% + half of the rest by score", 11.8
        ),
        _tier("k4v2-pe5", "k4v2-pe5", "k4v2, keep first 5% + half of the rest by score", 12.2),
    ]
)
"""Named tiers: ours, the report's four core tiers, and its 12-point sweep (explicit parameters)."""
