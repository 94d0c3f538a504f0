"""The package layout: one distribution, no shadowed stdlib modules, a complete CLI map."""

from __future__ import annotations

import codecs
import subprocess
import sys

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
