"""CodecSpec parsing, canonical strings, the eviction budget and the tier table."""

from __future__ import annotations

import pytest

from deltastore.codecs import TIERS, CodecSpec
from deltastore.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("fp16", "fp16"),
        ("lossless", "lossless"),
        ("fp8", "fp8-g64"),
        ("k4v2", "k4v2-g64-kc"),
        ("K4V2-kt-g32", "k4v2-g32-kt"),
        ("k2v2-z-sink4", "k2v2-g64-kc-z-sink4"),
        ("k4v2-pe50", "k4v2-g64-kc-pe50-r16"),
        ("k4v2-r8-adapt30", "k4v2-g64-kc-adapt30-r8"),
        ("k8v8-nr", "k8v8-g64-kc-nr"),
        ("lossless-pe10", "lossless-pe10-r16"),
        ("k4v4", "k4v4-g64-kc"),  # older specs are spelled as before
        ("k4v4-keep88-hp16-z-sink4-p8", "k4v4-g64-kc-p8-z-sink4-hp16-keep88-r16"),
        ("k4v4-lo72-keep88-r32-z-sink4-p8", "k4v4-g64-kc-p8-z-sink4-keep88-lo72-r32"),
    ],
)
def test_parse_canonical_roundtrip(text: str, canonical: str) -> None:
    spec = CodecSpec.parse(text)
    assert spec.canonical() == canonical == spec.name
    assert CodecSpec.parse(canonical) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "k5v2",
        "k4v2-g48",
        "k4v2-g4",
        "k4v2-pe100",
        "k4v2-pe50-adapt30",
        "k4v2-kc-kt",
        "fp16-kc",
        "lossless-z",
        "fp16-sink4",
        "k4v2-r8",
        "k4v2-bogus",
        "fp16-g64",
        "k4v2-g64-g64",
        "x" * 200,
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        CodecSpec.parse(text)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("fp8-hp16", "kXvY codecs only"),
        ("fp16-p8", "kXvY codecs only"),
        ("k8v8-hp16", "already 8-bit"),
        ("k4v4-hp16-pe30", "needs keep<P>"),
        ("k4v4-hp32-keep50-r16", "exceeds the recent window"),
        ("k4v4-hp0", "must be in"),
        ("k4v4-p8-p8", "given twice"),
        ("k4v4-hp8-hp16", "given twice"),
        ("k4v4-lo50", "needs a kXvY codec with keep"),
        ("k4v4-pe50-lo20", "needs a kXvY codec with keep"),
        ("fp8-keep50-lo20", "needs a kXvY codec with keep"),
        ("k4v4-keep50-lo60", "L must be in"),
        ("k4v4-keep50-lo0", "at least 1"),
        ("k2v2-keep50-lo20", "already 2-bit"),
        ("k4v4-keep50-lo20-lo10", "given twice"),
    ],
)
def test_parse_rejects_with_reason(text: str, match: str) -> None:
    """p8, hp<N> and lo<L>: each refusal says why."""
    with pytest.raises(InvalidArgument, match=match):
        CodecSpec.parse(text)


def test_bit_exact_only_lossless_without_eviction() -> None:
    assert CodecSpec.parse("lossless").bit_exact
    assert not CodecSpec.parse("lossless-pe50").bit_exact
    assert not any(CodecSpec.parse(s).bit_exact for s in ("fp16", "fp8", "k8v8", "k4v4"))


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 20, 63, 64, 100, 1000, 4096])
@pytest.mark.parametrize(
    "spec_text", ["k4v2-pe50", "k4v2-pe10", "k4v2-adapt30", "k4v2-pe0-r0", "k4v2-adapt5-r4"]
)
@pytest.mark.parametrize("start", [0, 2, 1000])
def test_kept_tokens_budget(n: int, spec_text: str, start: int) -> None:
    spec = CodecSpec.parse(spec_text)
    kept = spec.kept_tokens(n, start)
    budget = -(-n * (100 + spec.evict_pct) // 200)
    forced = spec.forced_prefix(n, start) + min(spec.recent, n)
    assert kept == max(budget, forced)
    assert forced <= n and kept <= n
    assert spec.forced_prefix(n, start) >= min(max(4 - start, 0), n - min(spec.recent, n))


def test_report_tiers_are_named_honestly() -> None:
    report_lossless = TIERS["report-lossless (k4v4)"]
    assert not report_lossless.spec.bit_exact and report_lossless.spec.canonical() == "k4v4-g64-kc"
    assert TIERS["lossless"].spec.bit_exact
    sweep = [t for t in TIERS.values() if t.report_ratio is not None]
    assert len(sweep) == 12
    assert TIERS["balanced (k4v2-pe30)"].spec == CodecSpec.parse("k4v2-pe30")
    assert TIERS["k4v2-adapt10"].spec.eviction == "adapt"
