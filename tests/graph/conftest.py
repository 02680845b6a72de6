"""Fixtures for the Graph client/token tests: the fake tenant (pytest-twisted, real reactor)."""

from ldapsync.testing.fixtures import fake_app, fake_tenant  # noqa: F401
