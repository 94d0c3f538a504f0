"""The per-layer calibration behind up<layers>: windows apart from the tuning runs', the stored
calibration consistent with its own ranking."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from deltastore.bench.quality_calibrate import TUNE_SUBSET, calibration_windows
from deltastore.codecs import CodecSpec

ROOT = Path(__file__).resolve().parents[2]


def test_calibration_windows_avoid_the_tuning_runs_windows() -> None:
    windows = list(range(37))
    scored = {windows[i * len(windows) // TUNE_SUBSET] for i in range(TUNE_SUBSET)}
    picked = calibration_windows(windows, 6)
    assert len(picked) == 6 == len(set(picked)) and not set(picked) & scored
    assert picked == calibration_windows(windows, 6)  # deterministic: the stored file is reproducible


def test_stored_calibration_names_its_most_sensitive_layers() -> None:
    cal = json.loads((ROOT / "codecs" / "data" / "calibration-smollm2.json").read_text())
    sens, order = cal["sensitivity"], cal["order"]
    assert sorted(order) == list(range(len(sens))) and all(
        sens[a] >= sens[b] for a, b in itertools.pairwise(order)
    )
    assert CodecSpec.parse(cal["base"]).canonical() == cal["base"]
    for name, spec in cal["specs"].items():
        parsed = CodecSpec.parse(spec)
        n = int(name.removeprefix("top"))
        assert parsed.up_layers == tuple(sorted(order[:n]))
        assert parsed.canonical().replace(f"-up{'.'.join(map(str, parsed.up_layers))}", "") == cal["base"]
