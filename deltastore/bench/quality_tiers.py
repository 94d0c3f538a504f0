"""Recommended tiers by quality budget, from a measured quality run.

``recommend(doc)`` keeps the dedup-safe rows of a full ``deltastore bench quality`` run (their
eviction never depends on tokens after a stored block; stored in the run's block size; scored as
``capture_scores`` scores by default, so a row's KL is what a worker gets) and writes them with the run's provenance
to ``deltastore/bench/data/recommended_tiers.json``. ``pick_tier(max_kl)`` reads that table and
returns the spec of the highest ratio measured with mean KL at most ``max_kl``.

Specs the installed codec cannot parse (e.g. a table written by a newer version) are listed with
``"available": false`` and are only returned on request.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from deltastore.errors import InvalidArgument, NotFound

__all__ = ["BUDGETS", "load_table", "pick_tier", "recommend"]

BUDGETS = (0.002, 0.01, 0.024, 0.05, 0.1, 0.2)
"""Quality budgets (mean KL, nats) named in the table: the report's grades and its frontier targets."""

_TABLE = "recommended_tiers.json"


def _available(spec: str) -> bool:
    from deltastore.codecs import CodecSpec

    try:
        CodecSpec.parse(spec)
    except InvalidArgument:
        return False
    return True


def recommend(doc: dict[str, Any]) -> dict[str, Any]:
    """The recommended-tiers table from a quality-run JSON document."""
    points = sorted(
        (
            {
                "spec": r["spec"],
                "config": r["config"],
                "ratio": round(r["ratio"], 3),
                "kl_mean": round(r["kl_mean"], 5),
                "top1": round(r["top1"], 4),
                "scores": r["scores"],
                "available": _available(r["spec"]),
            }
            for r in doc["rows"]
            if r["group"] != "peer"
            and r["dedup_safe"]
            and r.get("scores") in (None, "block")  # what capture_scores gives a worker by default
            and r.get("segment_tokens", doc["block"]) == doc["block"]
            and not r.get("whole_prefix")
        ),
        key=lambda p: (-p["ratio"], p["kl_mean"]),
    )
    by_budget = {}
    for budget in BUDGETS:
        best = {}
        for available_only in (True, False):
            fit = [p for p in points if p["kl_mean"] <= budget and (p["available"] or not available_only)]
            best["available" if available_only else "any"] = fit[0]["spec"] if fit else None
        by_budget[str(budget)] = best
    source = {k: doc[k] for k in ("model", "text", "windows", "ctx", "eval", "block", "seed")}
    return {"source": source, "budgets": by_budget, "points": points}


def load_table() -> dict[str, Any]:
    """The shipped table (written by ``deltastore bench quality --recommend``)."""
    text = resources.files("deltastore.bench").joinpath("data", _TABLE).read_text("utf-8")
    return json.loads(text)


def pick_tier(max_kl: float, *, available_only: bool = True, table: dict[str, Any] | None = None) -> str:
    """The spec with the highest measured ratio whose mean KL is at most ``max_kl``.

    Args:
        max_kl: quality budget, mean KL(p_fp16 || p_compressed) in nats per token.
        available_only: only specs the installed codec can encode (else also proposed ones).
        table: a table from :func:`recommend` (default: the shipped one).
    Raises:
        InvalidArgument: ``max_kl`` is negative or not a number.
        NotFound: nothing measured fits the budget (KL 0 always fits: the bit-exact tier).
    """
    if not isinstance(max_kl, int | float) or not max_kl >= 0:
        raise InvalidArgument(f"max_kl must be a number >= 0, got {max_kl!r}")
    points = (table or load_table())["points"]
    fit = [p for p in points if p["kl_mean"] <= max_kl and (p["available"] or not available_only)]
    if not fit:
        raise NotFound(f"no measured tier has mean KL <= {max_kl}", hint="raise --max-kl")
    return max(fit, key=lambda p: (p["ratio"], -p["kl_mean"]))["spec"]
