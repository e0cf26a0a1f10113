"""Fixtures of the approval tests: both state backends, operators in approver groups."""

from __future__ import annotations

from tests.state.conftest import backend, redis_prefix  # noqa: F401  (shared fixtures: SQLite and Redis)
