"""Fixtures of the trust tests, and the recorder behind RELIABILITY.md.

Each test records the faults and bad inputs it tried with ``reliability.record(fault, tries,
outcome)``; when the session ends, the records of every test that ran (with that test's pass or
fail) are written as JSON to ``build/reliability.json`` (or ``$DELTASTORE_RELIABILITY_JSON``).
``python tests/trust/reliability_report.py`` turns that file into RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_RECORDS: dict[str, list[dict[str, object]]] = {}
_OUTCOMES: dict[str, str] = {}
_STARTED = time.time()


@dataclass
class Reliability:
    """Collects what one test tried: ``record("bit flip in a stored block", 40, "DATA_LOSS naming the block")``."""

    test: str
    area: str
    rows: list[dict[str, object]] = field(default_factory=list)

    def record(self, fault: str, tries: int, outcome: str) -> None:
        self.rows.append({"area": self.area, "fault": fault, "tries": tries, "outcome": outcome})


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Reliability]:
    area = Path(str(request.node.fspath)).stem.removeprefix("test_")
    rec = Reliability(request.node.nodeid, area)
    yield rec
    _RECORDS.setdefault(request.node.nodeid, []).extend(rec.rows)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES[item.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _RECORDS:
        return
    out = Path(
        os.environ.get(
            "DELTASTORE_RELIABILITY_JSON", str(Path(session.config.rootpath) / "build" / "reliability.json")
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tests = [
        {"test": nodeid, "outcome": _OUTCOMES.get(nodeid, "unknown"), "rows": rows}
        for nodeid, rows in sorted(_RECORDS.items())
    ]
    out.write_text(
        json.dumps(
            {
                "generated_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "duration_s": round(time.time() - _STARTED, 1),
                "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                "tests": tests,
            },
            indent=1,
        )
    )
