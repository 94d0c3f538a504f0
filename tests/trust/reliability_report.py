"""Render RELIABILITY.md from the records of a trust test run.

Usage: ``.venv/bin/python -m pytest -q tests/trust && .venv/bin/python tests/trust/reliability_report.py``
(reads ``build/reliability.json``, written by tests/trust/conftest.py; writes RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AREAS = {
    "exposure": "Secure defaults",
    "auth": "Authentication, roles, TLS",
    "isolation": "Tenant isolation",
    "hostile": "Hostile input",
    "corruption": "Corruption",
    "crash": "Crash",
    "load": "Load and full store",
    "damage_local": "Damage stays local (quarantine, repair)",
    "bombs": "Decompression bombs and forged sizes",
    "end_to_end": "End-to-end integrity (client-side checks)",
    "shm_peers": "Shared memory boundary",
    "threads": "Handler threads and streams",
    "quotas": "Per-tenant quotas",
    "small_leaks": "Small leaks",
}


def render(run: dict) -> str:
    lines = [
        "# DeltaStore reliability report",
        "",
        "Generated from a run of `tests/trust` by `tests/trust/reliability_report.py`; do not edit by hand.",
        f"Run: {run['generated_at']} UTC, {run['duration_s']} s, {run['machine']}.",
        "",
        "Each row is a fault or bad input the tests tried, how many times, what happened, and whether",
        "the test that tried it passed (it fails on any other outcome).",
        "",
    ]
    by_area: dict[str, list[tuple[dict, str]]] = {}
    merged: dict[tuple[str, str, str, str], dict] = {}  # parametrized tests: one row, tries summed
    for test in run["tests"]:
        for row in test["rows"]:
            key = (row["area"], row["fault"], row["outcome"], test["outcome"])
            if key in merged:
                merged[key]["tries"] += row["tries"]
                continue
            merged[key] = dict(row)
            by_area.setdefault(row["area"], []).append((merged[key], test["outcome"]))
    total = sum(len(rows) for rows in by_area.values())
    passed = sum(1 for rows in by_area.values() for _, outcome in rows if outcome == "passed")
    lines += [f"**{passed} of {total} rows passed.**", ""]
    for area in [*AREAS, *sorted(set(by_area) - set(AREAS))]:
        rows = by_area.get(area)
        if not rows:
            continue
        lines += [
            f"## {AREAS.get(area, area)}",
            "",
            "| fault / input | tries | outcome | test |",
            "|---|---:|---|---|",
        ]
        for row, outcome in rows:
            fault = row["fault"].replace("|", "\\|")
            result = row["outcome"].replace("|", "\\|")
            lines.append(f"| {fault} | {row['tries']} | {result} | {outcome} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "reliability.json")
    parser.add_argument("--out", type=Path, default=ROOT / "RELIABILITY.md")
    args = parser.parse_args()
    args.out.write_text(render(json.loads(args.json.read_text())))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
