"""The quality benchmark's --quick run on the real SmolLM2 model, and the tier picker.

One quick run (2 windows, 127 cached tokens, 16 scored) is shared by the module; it checks the
protocol's sanity: exact tiers score KL 0, KL grows as bits drop, and every measured ratio equals
the codec's own size arithmetic.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from deltastore.bench.quality import grade
from deltastore.bench.quality_configs import segments
from deltastore.cli import main
from deltastore.codecs import encoded_nbytes
from deltastore.codecs.tiers import pick_tier, recommend
from deltastore.errors import InvalidArgument, NotFound


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("quality") / "quality.json"
    assert main(["bench", "quality", "--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text()), out


def _rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["spec"]: r for r in doc["rows"]}


@pytest.mark.slow
def test_outputs_and_schema(quick: tuple[dict[str, Any], Path]) -> None:
    doc, path = quick
    assert {"model", "text", "windows", "ctx", "eval", "rows"} <= doc.keys()
    assert doc["windows"] == 2
    for r in doc["rows"]:
        assert {"config", "spec", "ratio", "kl_mean", "kl_p95", "top1", "grade", "kept_fraction"} <= r.keys()
        assert r["grade"] == grade(r["kl_mean"])
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert "| K4V2 |" in path.with_suffix(".md").read_text()


@pytest.mark.slow
def test_exact_tiers_are_exact(quick: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(quick[0])
    for spec in ("fp16", "lossless"):
        assert rows[spec]["kl_mean"] == 0.0
        assert rows[spec]["kl_p95"] == 0.0
        assert rows[spec]["top1"] == 1.0


@pytest.mark.slow
def test_kl_grows_as_bits_drop(quick: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(quick[0])
    assert 0 < rows["k8v8"]["kl_mean"] < rows["k4v4"]["kl_mean"] < rows["k4v2"]["kl_mean"]
    assert rows["k4v2-pe50"]["kept_fraction"] < 1.0


@pytest.mark.slow
def test_demoting_costs_less_quality_than_dropping(quick: tuple[dict[str, Any], Path]) -> None:
    """lo<L>: the same 4-bit tokens as keep50, the other half at 2 bits instead of dropped."""
    rows = _rows(quick[0])
    drop, demote = rows["k4v4-sink4-keep50-r16"], rows["k4v4-sink4-keep100-lo50-r16"]
    assert demote["kept_fraction"] == 1.0 and drop["kept_fraction"] < 1.0
    assert demote["kl_mean"] < drop["kl_mean"] and demote["ratio"] < drop["ratio"]


@pytest.mark.slow
def test_ratios_match_codec_arithmetic(quick: tuple[dict[str, Any], Path]) -> None:
    doc = quick[0]
    n_cached = doc["ctx"] - 1
    fp16 = 30 * 2 * 3 * n_cached * 64 * 2  # SmolLM2: 30 layers, 3 KV heads, head_dim 64
    for r in doc["rows"]:
        if r["spec"] == "lossless":
            continue  # zstd: data-dependent size
        stored = sum(
            encoded_nbytes(
                r["spec"], n_layers=30, kv_heads=3, head_dim=64, n_tokens=e - s, start=s, seq_end=n_cached
            )
            for s, e in segments(n_cached, doc["block"])
        )
        assert r["bytes_per_window"] == stored
        assert r["ratio"] == pytest.approx(fp16 / stored, rel=1e-12)


_TABLE = {
    "points": [
        {"spec": "k4v4-sink4-z-keep30", "ratio": 11.0, "kl_mean": 0.05, "available": False},
        {"spec": "k4v2", "ratio": 4.6, "kl_mean": 0.05, "available": True},
        {"spec": "k4v4", "ratio": 3.6, "kl_mean": 0.01, "available": True},
        {"spec": "lossless", "ratio": 1.05, "kl_mean": 0.0, "available": True},
    ]
}


def test_pick_tier_highest_ratio_under_budget() -> None:
    assert pick_tier(0.0, table=_TABLE) == "lossless"
    assert pick_tier(0.02, table=_TABLE) == "k4v4"
    assert pick_tier(0.05, table=_TABLE) == "k4v2"
    assert pick_tier(0.05, available_only=False, table=_TABLE) == "k4v4-sink4-z-keep30"
    with pytest.raises(InvalidArgument):
        pick_tier(-1.0, table=_TABLE)
    with pytest.raises(NotFound):
        pick_tier(0.001, table={"points": _TABLE["points"][:2]})


@pytest.mark.slow
def test_recommend_from_quick_run(quick: tuple[dict[str, Any], Path]) -> None:
    table = recommend(quick[0])
    assert pick_tier(0.0, table=table) in ("fp16", "lossless")
    assert table["budgets"]["0.2"]["available"] is not None


def _row(spec: str, ratio: float, kl: float, scores: str | None, dedup_safe: bool = True) -> dict[str, Any]:
    return {
        "spec": spec,
        "config": f"{spec} {scores}",
        "group": "frontier",
        "ratio": ratio,
        "kl_mean": kl,
        "top1": 0.9,
        "scores": scores,
        "dedup_safe": dedup_safe,
        "segment_tokens": 64,
    }


def _run(text: str, rows: list[dict[str, Any]], model: str = "m") -> dict[str, Any]:
    doc = {"model": model, "text": text, "windows": 8, "ctx": 512, "eval": 64, "block": 64, "seed": 0}
    return {**doc, "rows": rows}


def test_recommend_keeps_what_a_worker_gets() -> None:
    """Rows scored other than by the default capture (causal windows, the key-norm proxy, a window
    over the whole prompt) are measurements, never recommendations."""
    row = _row
    doc = {"model": "m", "text": "t", "windows": 8, "ctx": 512, "eval": 64, "block": 64, "seed": 0}
    doc["rows"] = [
        row("k4v4-kt-sink4-z-keep30-r64", 9.07, 0.05, "causal"),
        row("k4v4-kt-sink4-z-keep25-r64", 10.0, 0.04, "knorm"),
        row("k4v4-kt-sink4-z-keep20-r64", 11.0, 0.03, "window", dedup_safe=False),
        row("k4v4-kt-sink4-z-keep30-r64", 9.06, 0.04, "block"),
        row("k4v4", 3.55, 0.005, "block"),
    ]
    table = recommend(doc)
    assert [p["scores"] for p in table["points"]] == ["block", "block"]
    assert pick_tier(0.05, table=table) == "k4v4-kt-sink4-z-keep30-r64"
    assert pick_tier(0.01, table=table) == "k4v4"


def test_a_budget_must_hold_on_every_measured_text() -> None:
    """Eviction harmless on prose can cost several times the KL on copy-heavy text: with runs on
    two texts a point counts at its worst KL, and only if both measured it."""
    prose = _run(
        "prose",
        [
            _row("k4v4-sink4-z-keep30-r64", 8.3, 0.036, "block"),
            _row("k4v4-sink4-z-keep50-r64", 6.2, 0.027, "block"),
            _row("k4v4-sink4-z", 3.72, 0.002, "block"),
            _row("k4v4-sink4-z-keep20-r64", 10.3, 0.049, "block"),  # not measured on the other text
        ],
    )
    code = _run(
        "code",
        [
            _row("k4v4-sink4-z-keep30-r64", 8.28, 0.12, "block"),
            _row("k4v4-sink4-z-keep50-r64", 6.18, 0.028, "block"),
            _row("k4v4-sink4-z", 3.72, 0.002, "block"),
        ],
    )
    assert pick_tier(0.05, table=recommend(prose)) == "k4v4-sink4-z-keep20-r64"
    table = recommend(prose, code)
    assert pick_tier(0.05, table=table) == "k4v4-sink4-z-keep50-r64"
    point = next(p for p in table["points"] if p["spec"] == "k4v4-sink4-z-keep30-r64")
    assert point["kl_mean"] == 0.12 and point["ratio"] == 8.28
    assert point["kl_by_text"] == {"prose": 0.036, "code": 0.12}
    assert [t["text"] for t in table["texts"]] == ["prose", "code"]
    with pytest.raises(InvalidArgument, match="model"):
        recommend(prose, _run("code", [], model="other"))


def test_recommend_also_needs_a_readable_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --recommend-also path fails before the (long) run starts, with a message, not a traceback."""
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--quick", "--json", str(out), "--recommend", str(tmp_path / "r.json")]
    assert main([*argv, "--recommend-also", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the quality run" in capsys.readouterr().err and not out.exists()


def test_corpus_is_split_by_document_and_licensed() -> None:
    """The shipped corpus: four kinds, each document wholly in one split, both splits holding
    every kind, a licence for each, and enough text (~63K SmolLM2 tokens; ~4 characters each)."""
    from importlib import resources

    from deltastore.bench.quality import corpus_manifest

    docs = corpus_manifest()
    root = resources.files("deltastore.bench").joinpath("data", "corpus")
    licences = root.joinpath("LICENSES.md").read_text("utf-8")
    assert len({d["name"] for d in docs}) == len(docs)
    kinds = {"prose", "docs", "code", "chat"}
    for split in ("tune", "report"):
        assert {d["kind"] for d in docs if d["split"] == split} == kinds
    chars = 0
    for d in docs:
        assert d["split"] in ("tune", "report") and f"`{d['licence']}`" in licences
        chars += len(root.joinpath(d["file"]).read_text("utf-8"))
    assert chars > 160_000
    assert all(d["split"] == "tune" for d in docs if d["name"].startswith("gardiner"))  # tuned on before


def test_doc_windows_do_not_overlap() -> None:
    from deltastore.bench.quality_eval import doc_windows

    assert doc_windows(100, 60, 10, 4) == [0]
    assert doc_windows(69, 60, 10, 4) == []
    starts = doc_windows(2500, 512, 64, 4)
    assert len(starts) == 4 and starts[0] == 0 and starts[-1] + 576 <= 2500
    assert all(b - a >= 576 for a, b in itertools.pairwise(starts))
    assert len(doc_windows(10_000, 512, 64, 3)) == 3


def test_bootstrap_interval_and_separation() -> None:
    from deltastore.bench.quality import bootstrap_ci, windows_to_separate

    values = [0.01 * (i % 5) for i in range(40)]
    lo, hi = bootstrap_ci(values)
    mean = sum(values) / len(values)
    assert lo < mean < hi and hi - lo < 0.02
    assert bootstrap_ci(values) == (lo, hi)  # seeded: reproducible
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    a = [0.010 + 0.001 * (i % 3) for i in range(30)]
    assert windows_to_separate(a, a) is None
    near = windows_to_separate(a, [x + 0.0001 * (i % 4) for i, x in enumerate(a)])
    far = windows_to_separate(a, [x + 0.005 for x in a])
    assert far == 2 and near is not None and near > far
