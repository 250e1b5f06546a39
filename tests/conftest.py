"""Shared pytest fixtures: isolated Prefect and MLflow state, so tests never touch the user's."""

from __future__ import annotations

import os

import pytest

# Keep Prefect's home (cached results, local storage) out of the user's ~/.prefect for the whole test session.
os.environ.setdefault("PREFECT_HOME", os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"tessera-prefect-{os.getpid()}"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test gets its own MLflow store unless it sets one itself."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for the flow tests of this session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
