"""Recommended tiers by quality budget, from measured quality runs.

Two shipped tables. ``engine_tiers.json``: engine-usable tiers (no eviction, no attention scores:
what a paged engine cache such as vLLM's can take), measured on the *report* split of the shipped
corpus (``deltastore bench quality --groups engine --split report --recommend ...``), each point
with its mean KL and the upper end of its 95% bootstrap interval over windows; a budget is met
only at that upper end. ``recommended_tiers.json``: every dedup-safe tier, eviction included
(the engine rows plus eviction rows chosen on the tuning split), on the same report windows,
budgets likewise at the upper end of the interval.

``recommend(doc, *others)`` keeps the dedup-safe rows of a full ``deltastore bench quality`` run
(their eviction never depends on tokens after a stored block; stored in the run's block size;
scored as ``capture_scores`` scores by default, so a row's KL is what a worker gets) and writes
them with the runs' provenance to ``codecs/data/recommended_tiers.json``. With runs on
other texts (same model and protocol), a row counts only if every run measured it, at its worst
KL and lowest ratio over the texts: eviction that is harmless on prose can cost 2-5x the KL on
copy-heavy technical text, and a budget should hold on both. ``pick_tier(max_kl)`` reads that
table and returns the spec of the highest ratio measured with mean KL at most ``max_kl`` (with an
interval: its upper end); ``pick_tier(max_kl, engine=True)`` reads the engine table.

Specs the installed codec cannot parse (e.g. a table written by a newer version) are listed with
``"available": false`` and are only returned on request.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from deltastore.errors import InvalidArgument, NotFound

__all__ = ["BUDGETS", "kl_bound", "load_table", "pick_tier", "recommend"]

BUDGETS = (0.002, 0.01, 0.024, 0.05, 0.1, 0.2)
"""Quality budgets (mean KL, nats) named in the table: the report's grades and its frontier targets."""

_TABLE = "recommended_tiers.json"
_ENGINE_TABLE = "engine_tiers.json"


def kl_bound(point: dict[str, Any]) -> float:
    """The KL a budget is checked against: the upper end of the point's 95% interval when it
    has one, else its mean."""
    return point.get("kl_hi", point["kl_mean"])


def _engine_usable(spec: str) -> bool:
    """No eviction (a paged cache needs every position) and hence no attention scores."""
    from deltastore.codecs import CodecSpec

    try:
        return not CodecSpec.parse(spec).evicts
    except InvalidArgument:
        return False


def _available(spec: str) -> bool:
    from deltastore.codecs import CodecSpec

    try:
        CodecSpec.parse(spec)
    except InvalidArgument:
        return False
    return True


def _rows(doc: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rows of a run a worker gets, by (spec, scores)."""
    return {
        (r["spec"], r.get("scores")): r
        for r in doc["rows"]
        if r["group"] != "peer"
        and r["dedup_safe"]
        and r.get("scores") in (None, "block")  # what capture_scores gives a worker by default
        and r.get("segment_tokens", doc["block"]) == doc["block"]
        and not r.get("whole_prefix")
    }


_SOURCE_KEYS = ("model", "text", "windows", "ctx", "eval", "block", "seed")


def recommend(doc: dict[str, Any], *others: dict[str, Any]) -> dict[str, Any]:
    """The recommended-tiers table from a quality-run JSON document and, optionally, runs of the
    same model and protocol on other texts (each point: worst KL and lowest ratio over all runs).

    Raises:
        InvalidArgument: the runs differ in model, context, continuation or block size.
    """
    docs = (doc, *others)
    for other in others:
        for field in ("model", "ctx", "eval", "block"):
            if other[field] != doc[field]:
                raise InvalidArgument(f"runs differ in {field}: {doc[field]!r} vs {other[field]!r}")
    tables = [_rows(d) for d in docs]
    points = []
    for key, r in tables[0].items():
        runs = [t[key] for t in tables if key in t]
        if len(runs) < len(tables):
            continue  # not measured on every text
        worst = max(runs, key=lambda x: x.get("kl_ci95", (0, x["kl_mean"]))[1])
        point = {
            "spec": r["spec"],
            "config": r["config"],
            "ratio": round(min(x["ratio"] for x in runs), 3),
            "kl_mean": round(worst["kl_mean"], 5),
            "top1": round(min(x["top1"] for x in runs), 4),
            "scores": r["scores"],
            "available": _available(r["spec"]),
            "engine": _engine_usable(r["spec"]),
        }
        if "kl_ci95" in worst:
            point["kl_lo"], point["kl_hi"] = (round(x, 5) for x in worst["kl_ci95"])
            point["worst_kind"] = worst.get("worst_kind")
            point["kl_by_kind"] = {k: round(v, 5) for k, v in worst.get("kl_by_kind", {}).items()}
        for metric in ("encode_gbs", "decode_gbs"):
            if metric in r:
                point[metric] = round(r[metric], 3)
        if others:
            point["kl_by_text"] = {d["text"]: round(x["kl_mean"], 5) for d, x in zip(docs, runs, strict=True)}
        points.append(point)
    points.sort(key=lambda p: (-p["ratio"], p["kl_mean"]))
    by_budget = {}
    for budget in BUDGETS:
        best = {}
        for available_only in (True, False):
            fit = [p for p in points if kl_bound(p) <= budget and (p["available"] or not available_only)]
            best["available" if available_only else "any"] = fit[0]["spec"] if fit else None
        by_budget[str(budget)] = best
    source = {k: doc.get(k) for k in (*_SOURCE_KEYS, "split", "per_doc")}
    table: dict[str, Any] = {"source": source, "budgets": by_budget, "points": points}
    if others:
        table["texts"] = [{k: d.get(k) for k in _SOURCE_KEYS} for d in docs]
    return table


def load_table(engine: bool = False) -> dict[str, Any]:
    """A shipped table (written by ``deltastore bench quality --recommend``): the engine-usable
    one, measured on the report split, or the one of every dedup-safe tier."""
    name = _ENGINE_TABLE if engine else _TABLE
    text = resources.files("deltastore.codecs").joinpath("data", name).read_text("utf-8")
    return json.loads(text)


def pick_tier(
    max_kl: float, *, available_only: bool = True, table: dict[str, Any] | None = None, engine: bool = False
) -> str:
    """The spec with the highest measured ratio whose KL (the upper end of its interval when
    the table has one, else its mean) is at most ``max_kl``.

    Args:
        max_kl: quality budget, mean KL(p_fp16 || p_compressed) in nats per token.
        available_only: only specs the installed codec can encode (else also proposed ones).
        table: a table from :func:`recommend` (default: the shipped one).
        engine: only engine-usable specs (no eviction, no scores); the default table is then the
            engine one.
    Raises:
        InvalidArgument: ``max_kl`` is negative or not a number.
        NotFound: nothing measured fits the budget (KL 0 always fits: the bit-exact tier).
    """
    if not isinstance(max_kl, int | float) or not max_kl >= 0:
        raise InvalidArgument(f"max_kl must be a number >= 0, got {max_kl!r}")
    points = (table or load_table(engine))["points"]
    fit = [
        p
        for p in points
        if kl_bound(p) <= max_kl
        and (p["available"] or not available_only)
        and (not engine or p.get("engine", _engine_usable(p["spec"])))
    ]
    if not fit:
        raise NotFound(f"no measured tier has mean KL <= {max_kl}", hint="raise --max-kl")
    return max(fit, key=lambda p: (p["ratio"], -kl_bound(p)))["spec"]
