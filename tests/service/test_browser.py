"""The savings page renders its chart in a real headless Chromium (screenshot colour check)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import MODEL, make_cache

from deltastore.client.sync import DeltaStoreClient
from deltastore.server.app import Service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# The page's layer colours (server/static/index.html): codec, prefix dedup, temporal delta.
COLOURS = {
    "codec": (0x2B, 0x6C, 0xB0),
    "prefix_dedup": (0xDD, 0x6B, 0x20),
    "temporal_delta": (0x2F, 0x85, 0x5A),
}


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: apt-get install -y chromium chromium-driver (Debian) to run this test",
)
def test_savings_page_draws_every_layer(service: Service, client: DeltaStoreClient, tmp_path: Path) -> None:
    tokens = list(range(1000, 1200))
    cache = make_cache(200)
    client.put_snapshot(
        "a", 0, tokens[:150], [(k[:, :150], v[:, :150]) for k, v in cache], model=MODEL, codec="k4v2"
    )
    client.put_snapshot("a", 1, tokens, cache, model=MODEL, codec="k4v2", parent_turn=0)
    other = [(torch.cat([k[:, :128], k[:, :72]], 1), torch.cat([v[:, :128], v[:, :72]], 1)) for k, v in cache]
    client.put_snapshot("b", 0, tokens[:128] + tokens[:72], other, model=MODEL, codec="k4v2")
    layers = httpx.get(f"http://127.0.0.1:{service.http_port}/v1/savings").json()["layers"]
    assert min(layers.values()) > 1.0  # every layer contributes, so every colour must be drawn

    shot = tmp_path / "page.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1100,1400",
            f"http://127.0.0.1:{service.http_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    if keep := os.environ.get("DELTASTORE_KEEP_SCREENSHOT"):
        shutil.copy(shot, keep)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1100, 1400)
    pixels = np.asarray(image).astype(np.int16)
    counts = {name: int((np.abs(pixels - colour) <= 6).all(-1).sum()) for name, colour in COLOURS.items()}
    assert all(n > 500 for n in counts.values()), counts  # each layer has a visible bar
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 20  # text and boxes, not a blank page
