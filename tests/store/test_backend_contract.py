"""Runs the backend contract on every engine in ``store_testlib.BACKENDS``."""

from backend_contract import BackendContract


class TestBackendContract(BackendContract):
    pass
