"""The package layout: one distribution, no shadowed stdlib modules, a complete CLI map."""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deltastore.cli import BENCHES, COMMANDS


def test_stdlib_codecs_not_shadowed() -> None:
    import deltastore.codecs  # noqa: F401  (the folder codecs/ maps here)

    assert codecs.lookup("utf-8").name == "utf-8"
    assert "deltastore" not in (codecs.__file__ or "")


def test_generic_names_not_installed_top_level() -> None:
    for name in ("server", "client", "proto"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, cwd="/")
        assert proc.returncode != 0, f"top-level package {name!r} leaked into site-packages"


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deltastore", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name, _, _ in COMMANDS:
        assert name in out
    bench = subprocess.run(
        [sys.executable, "-m", "deltastore", "bench", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name, _, _ in BENCHES:
        assert name in bench


ROOT = Path(__file__).resolve().parents[1]


def test_every_package_ships_in_the_wheel() -> None:
    """setuptools lists packages by hand here (package-dir maps folders into one namespace): a new
    sub-package left off the list works in the editable install and is missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set(), "packages missing from [tool.setuptools] packages"
    assert listed - found == set(), "listed packages with no folder"


def test_layer_contract_holds(tmp_path: Path) -> None:
    """pyproject's import-linter contracts (layers point down; no torch under the server) hold."""
    subprocess.run([str(ROOT / "tools" / "package-tree.sh"), str(tmp_path)], check=True)
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


# Runs `deltastore serve` where torch, transformers and matplotlib cannot be imported, as on a
# server-only install (`pip install deltastore`), and reports the heavy modules it loaded.
_SERVE_WITHOUT_TORCH = """
import atexit, importlib.abc, sys
BLOCKED = ("torch", "transformers", "matplotlib", "numpy", "tqdm", "vllm")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
atexit.register(lambda: print("LOADED", sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED)), flush=True))
from deltastore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_server_runs_without_torch(tmp_path: Path) -> None:
    """A put and a get through a server that cannot import torch or transformers."""
    import torch

    from deltastore.client.sync import DeltaStoreClient

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SERVE_WITHOUT_TORCH,
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("deltastore serving"):
                break
        match = re.search(r"grpc=(\S+)", lines[-1])
        assert match, "".join(lines)
        gen = torch.Generator().manual_seed(0)
        cache = [
            (torch.randn(2, 80, 64, generator=gen), torch.randn(2, 80, 64, generator=gen)) for _ in range(2)
        ]
        with DeltaStoreClient(match.group(1), timeout=30) as client:
            put = client.put_snapshot("s", 0, list(range(80)), cache, model="m@0", codec="k4v2")
            got = client.get_snapshot("s", as_cache=False)
        assert put.new_segments == 2 and got.token_ids == list(range(80))
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "LOADED []" in out, out[-3000:]


def test_cli_output_into_a_closed_pipe_is_quiet() -> None:
    """`deltastore codecs --json | head -c 10`: the reader leaves early, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltastore", "codecs", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first write, like `head` exiting early
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141) and "Traceback" not in err, err
