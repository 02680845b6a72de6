"""Fixtures for the fake Microsoft 365 tenant's own tests."""

import pytest

from ldapsync.testing.fixtures import GraphCaller, fake_app, fake_tenant, graph_http  # noqa: F401


@pytest.fixture
def graph(fake_tenant, fake_app, graph_http):  # noqa: F811
    """An async Graph caller holding an app token with the default permissions."""
    return GraphCaller(graph_http, fake_tenant, fake_tenant.app_token(fake_app["client_id"]))

