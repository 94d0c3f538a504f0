"""The README's Python example runs as written against a real server, with the real model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deltastore.server.app import Service

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.slow


def test_readme_client_example_runs(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {"TARGET": f"127.0.0.1:{service.grpc_port}"})
    new_bytes, shared, temporal = (int(x) for x in capsys.readouterr().out.split())
    assert new_bytes > 0 and shared == 0 and temporal == 0
    savings = service.store.savings()
    assert savings["snapshots"] == 1 and savings["layers"]["codec"] > 3.0
