"""Fixtures for the codec tests: CUDA skipping and real SmolLM2 KV (model loaded once)."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import PROSE


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords and "codecs" in str(item.path):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_kv() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fp16 KV of SmolLM2-135M after prefilling ~256 tokens of real English text (30 layers x 3 x 64)."""
    from deltastore.client.models import load_model

    model, tok = load_model()
    ids = tok(PROSE, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256, "the test text must be at least 256 tokens long"
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return [(layer.keys[0].half(), layer.values[0].half()) for layer in cache.layers]
