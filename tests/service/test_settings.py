"""The typed settings layer: flag > environment > default, sizes, and errors that name their source."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deltastore.errors import InvalidArgument
from deltastore.server.settings import ServerSettings, add_setting_arguments
from deltastore.settings import StoreConfig, load_settings


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    return parser.parse_args(list(argv))


def test_flag_beats_environment_beats_default() -> None:
    env = {"DELTASTORE_WORKERS": "3", "DELTASTORE_STALL_SECONDS": "5", "DELTASTORE_SHM_MODE": "memfd"}
    settings = ServerSettings.load(_args("--workers", "7"), env)
    assert settings.workers == 7  # flag
    assert settings.stall_seconds == 5.0 and settings.shm_mode == "memfd"  # environment
    assert settings.max_watches == ServerSettings().max_watches == 8  # default


def test_sizes_switches_and_empty_strings() -> None:
    env = {"DELTASTORE_CHUNK_BYTES": "512KiB", "DELTASTORE_INSECURE": "yes", "DELTASTORE_HTTP_ADDRESS": ""}
    settings = ServerSettings.load(_args("--max-inflight-bytes", "1G"), env)
    assert settings.chunk_bytes == 512 << 10 and settings.max_inflight_bytes == 1 << 30
    assert settings.insecure is True
    assert settings.http_address == ""  # an empty server variable is a value: it turns the HTTP API off
    assert ServerSettings.load(_args("--insecure"), {"DELTASTORE_INSECURE": "0"}).insecure is True
    assert ServerSettings.load(None, {"DELTASTORE_INSECURE": ""}).insecure is False


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ((), {"DELTASTORE_WORKERS": "many"}, r"DELTASTORE_WORKERS='many': .*valid integer"),
        (("--workers", "many"), {"DELTASTORE_WORKERS": "3"}, r"--workers='many': .*valid integer"),
        ((), {"DELTASTORE_MAX_MESSAGE_BYTES": "lots"}, r"DELTASTORE_MAX_MESSAGE_BYTES='lots': not a size"),
        (("--stall-seconds", "0"), {}, r"--stall-seconds='0': .*greater than 0"),
        ((), {"DELTASTORE_SHM_MODE": "mmap"}, r"DELTASTORE_SHM_MODE='mmap': .*'file' or 'memfd'"),
        ((), {"DELTASTORE_INSECURE": "maybe"}, r"DELTASTORE_INSECURE='maybe': not a boolean"),
        (("--chunk-bytes", "8MiB"), {}, r"no room for framing"),
    ],
)
def test_errors_name_the_flag_or_variable(argv: tuple[str, ...], env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ServerSettings.load(_args(*argv), env)


def test_constructing_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTASTORE_WORKERS", "3")
    monkeypatch.setenv("DELTASTORE_BLOCK_SIZE", "16")
    assert ServerSettings().workers == 16 and StoreConfig().block_size == 64
    assert ServerSettings.load().workers == 3 and StoreConfig.load().block_size == 16
    with pytest.raises(InvalidArgument, match=r"workers=0: .*greater than 0"):
        ServerSettings(workers=0)
    with pytest.raises(InvalidArgument, match=r"unknown entry"):
        ServerSettings(wrokers=3)  # type: ignore[call-arg]


def test_store_and_lmdb_settings_from_the_environment() -> None:
    env = {
        "DELTASTORE_DATA_DIR": "/srv/ds",
        "DELTASTORE_BLOCK_SIZE": "16",
        "DELTASTORE_MAX_STORED_BYTES": "2GiB",
        "DELTASTORE_SESSION_TTL_S": "",  # empty store variables count as unset
        "DELTASTORE_SHARED_NAMESPACES": "a=g, b=g",
        "DELTASTORE_LMDB_MAP_SIZE": "64MiB",
        "DELTASTORE_LMDB_SYNC": "0",
    }
    settings = load_settings(env=env)
    assert settings.data_dir == Path("/srv/ds") and settings.lmdb.path == Path("/srv/ds")
    assert settings.store.block_size == 16 and settings.store.max_stored_bytes == 2 << 30
    assert settings.store.session_ttl_s is None
    assert settings.store.shared_groups == {"a": "g", "b": "g"} and settings.store.domain("a") == "shared:g"
    assert settings.lmdb.map_size == 64 << 20 and settings.lmdb.sync is False
    assert load_settings("/elsewhere", env).data_dir == Path("/elsewhere")  # --data-dir wins
    assert load_settings(env={}).lmdb.sync is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DELTASTORE_BLOCK_SIZE": "0"}, r"DELTASTORE_BLOCK_SIZE='0': .*greater than or equal to 1"),
        (
            {"DELTASTORE_SHARED_NAMESPACES": "a"},
            r"DELTASTORE_SHARED_NAMESPACES='a': entry 'a' is not ns=group",
        ),
        ({"DELTASTORE_SHARED_NAMESPACES": "a=b c"}, r"shared group 'b c' must match"),
        ({"DELTASTORE_LMDB_MAX_MAP_SIZE": "huge"}, r"DELTASTORE_LMDB_MAX_MAP_SIZE='huge': not a size"),
    ],
)
def test_store_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_settings(env=env)


def test_only_the_settings_module_reads_the_environment() -> None:
    """The core and the server read DELTASTORE_* variables in deltastore/settings.py alone."""
    root = Path(__file__).resolve().parents[2]
    readers = [
        path.relative_to(root).as_posix()
        for folder in ("deltastore", "server")
        for path in (root / folder).rglob("*.py")
        if "/v1/" not in path.as_posix()
        and any(word in path.read_text(encoding="utf-8") for word in ("os.environ", "getenv("))
    ]
    assert readers == ["deltastore/settings.py"]


def test_positional_arguments_are_refused() -> None:
    """``StoreConfig(256)`` once meant block_size=256; it must not be taken silently as something else."""
    with pytest.raises(TypeError):
        StoreConfig(256)  # type: ignore[misc]
    assert StoreConfig(block_size=256).block_size == 256
