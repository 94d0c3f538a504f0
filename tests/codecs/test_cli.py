"""`deltastore codecs` and `deltastore bench codecs`: real CLI runs, outputs checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltastore.cli import main
from deltastore.codecs import TIERS


def test_codecs_table_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["codecs", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["tiers"]}
    assert list(rows) == list(TIERS)
    for row in rows.values():
        if row["bits_per_element"] is not None:
            assert row["ratio_vs_fp16"] == 16 / row["bits_per_element"]
    assert rows["lossless"]["bit_exact"] and not rows["report-lossless (k4v4)"]["bit_exact"]
    assert rows["conservative (k4v2)"]["ratio_vs_fp16"] == pytest.approx(16 / 3.5, rel=1e-4)
    assert rows["balanced (k4v2-pe30)"]["kept_fraction"] == pytest.approx(0.65, abs=1e-3)
    assert rows["k4v2-pe50"]["kept_fraction"] == pytest.approx(0.75, abs=1e-3)


def test_codecs_table_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["codecs"]) == 0
    out = capsys.readouterr().out
    assert "report-lossless (k4v4)" in out and "4.57x" in out and "every byte counted" in out


def test_bench_codecs_writes_json_md_png(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    assert (
        main(["bench", "codecs", "--json", str(out), "--tokens", "8", "--repeat", "1", "--tiers", "k4v2"])
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["shape"] == {"n_layers": 32, "kv_heads": 8, "head_dim": 128, "tokens": 8}
    assert [r["spec"] for r in doc["rows"]] == ["k4v2-g64-kc"]
    for row in doc["rows"]:
        assert row["encode_gbps"] > 0 and row["decode_gbps"] > 0
        assert row["encode_vs_memcpy"] == pytest.approx(row["encode_gbps"] / row["memcpy_gbps"])
    assert doc["rows"][0]["ratio_vs_fp16"] > 3.0
    assert "| k4v2-g64-kc |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_kl_engine_picks_a_non_evicting_spec_within_its_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`codecs --max-kl X --engine`: the shipped engine table (report split) answers with a spec an
    engine's paged cache can take, whose interval's upper end is within the budget."""
    from deltastore.codecs import CodecSpec
    from deltastore.codecs.tiers import load_table, pick_tier

    table = load_table(engine=True)
    assert table["source"]["split"] == "report"
    for budget in (0.0, 0.01, 0.05, 0.2):
        assert main(["codecs", "--max-kl", str(budget), "--engine", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["spec"] == pick_tier(budget, engine=True)
        assert not CodecSpec.parse(doc["spec"]).evicts and doc["engine"]
        assert doc.get("kl_hi", doc["kl_mean"]) <= budget
    assert main(["codecs", "--engine"]) == 2
    assert "--max-kl" in capsys.readouterr().err
