"""Shared test helpers (keep this file small)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def _wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``pred`` until it is true; fail the test if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.001)


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """``wait_until(pred, timeout=5)``: wait, with a deadline, for a condition."""
    return _wait_until
