"""National clouds: which login host and Graph host a tenant lives behind.

Owns the mapping ``cloud`` → (authority host, Graph base URL) of Microsoft's
national-cloud deployments, the ``authority`` / ``graph_url`` overrides (also how tests point
at the fake tenant), and the token scope ``<graph host>/.default``.  Pure data;
no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ldapsync.config import Office365Config

__all__ = ["CLOUDS", "CloudEndpoints", "endpoints_from_config", "resolve_endpoints"]

#: cloud name → (authority host, Graph host)
CLOUDS: dict[str, tuple[str, str]] = {
    "global": ("https://login.microsoftonline.com", "https://graph.microsoft.com"),
    "usgov": ("https://login.microsoftonline.us", "https://graph.microsoft.us"),
    "usgov-dod": ("https://login.microsoftonline.us", "https://dod-graph.microsoft.us"),
    "china": ("https://login.chinacloudapi.cn", "https://microsoftgraph.chinacloudapi.cn"),
}

#: Authority hosts MSAL knows (instance discovery may stay on for these).
MICROSOFT_AUTHORITY_HOSTS = frozenset(urlsplit(a).hostname for a, _ in CLOUDS.values()) | {
    "login.microsoft.com", "login.windows.net", "sts.windows.net", "login.partner.microsoftonline.cn",
}

GRAPH_VERSION = "v1.0"


@dataclass(frozen=True)
class CloudEndpoints:
    authority: str          # https://login.microsoftonline.com/<tenant>
    graph_url: str          # https://graph.microsoft.com/v1.0 (no trailing slash)
    scope: str              # https://graph.microsoft.com/.default

    @property
    def scopes(self) -> list[str]:
        return [self.scope]

    @property
    def is_microsoft_authority(self) -> bool:
        """False for a proxy or test authority: MSAL then needs ``instance_discovery=False``."""
        return urlsplit(self.authority).hostname in MICROSOFT_AUTHORITY_HOSTS


def resolve_endpoints(cloud: str = "global", tenant: str = "", *, authority: str = "",
                      graph_url: str = "") -> CloudEndpoints:
    """Endpoints for ``cloud`` and ``tenant``; non-empty overrides win.

    ``authority`` is a full authority URL with the tenant segment
    (``https://login.example/contoso.onmicrosoft.com``).  ``graph_url`` is the
    Graph base including the version (``https://graph.microsoft.com/v1.0``);
    a bare host gets ``/v1.0`` appended.
    """
    if cloud not in CLOUDS:
        raise ValueError(f"unknown cloud {cloud!r}; expected one of {', '.join(CLOUDS)}")
    login_host, graph_host = CLOUDS[cloud]
    if authority:
        auth = authority.rstrip("/")
    else:
        if not tenant:
            raise ValueError("a tenant (id or domain) is needed to build the authority URL")
        auth = f"{login_host}/{tenant}"
    if graph_url:
        g = graph_url.rstrip("/")
        parts = urlsplit(g)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"graph_url must be an absolute URL, got {graph_url!r}")
        if parts.path in ("", "/"):
            g = f"{g}/{GRAPH_VERSION}"
        scope_host = f"{parts.scheme}://{parts.netloc}"
    else:
        g = f"{graph_host}/{GRAPH_VERSION}"
        scope_host = graph_host
    return CloudEndpoints(authority=auth, graph_url=g, scope=f"{scope_host}/.default")


def endpoints_from_config(cfg: Office365Config) -> CloudEndpoints:
    return resolve_endpoints(cfg.cloud, cfg.tenant, authority=cfg.authority, graph_url=cfg.graph_url)
