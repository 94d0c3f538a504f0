"""Coverage-guided fuzzing inside the suite, bounded in time (``make fuzz`` runs it longer).

Each target of ``fuzz_targets.py`` runs in its own process for ``DELTASTORE_FUZZ_SECONDS``
(default 10 s) from real seeds; a finding makes libFuzzer exit non-zero with the input saved
under the test's temp folder, and the test fails with the traceback. Executions are reported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

SCRIPT = Path(__file__).with_name("fuzz_targets.py")
SECONDS = int(os.environ.get("DELTASTORE_FUZZ_SECONDS", "10"))


@pytest.mark.parametrize("target", ["block", "wire"])
def test_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    corpus = Path(os.environ.get("DELTASTORE_FUZZ_CORPUS", tmp_path)) / target
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            target,
            f"-max_total_time={SECONDS}",
            "-print_final_stats=1",
            "-rss_limit_mb=4096",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SECONDS + 240,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fuzzing {target} found a failure:\n{log[-6000:]}"
    runs = int(re.search(r"stat::number_of_executed_units:\s+(\d+)", log).group(1))
    print(f"fuzz {target}: {runs} executions in {SECONDS} s, no finding")
    assert runs > 100
