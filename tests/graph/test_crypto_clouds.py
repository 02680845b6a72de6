"""SecretBox, the key file, and the cloud → endpoint mapping."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from ldapsync.config import Office365Config
from ldapsync.graph.clouds import endpoints_from_config, resolve_endpoints
from ldapsync.secretbox import DecryptionError, SecretBox, load_or_create_key


def test_round_trip_and_fresh_nonce() -> None:
    box = SecretBox(os.urandom(32))
    a, b = box.encrypt(b"refresh-token-xyz"), box.encrypt(b"refresh-token-xyz")
    assert a != b and a[:1] == b"\x01" and b"refresh-token" not in a
    assert box.decrypt(a) == box.decrypt(b) == b"refresh-token-xyz"
    assert box.decrypt(box.encrypt(b"")) == b""
    assert "SecretBox(<key>)" == repr(box)


@pytest.mark.parametrize("pos", [0, 1, 13, -1])
def test_tampering_is_detected(pos: int) -> None:
    box = SecretBox(os.urandom(32))
    blob = bytearray(box.encrypt(b"secret", aad=b"ctx"))
    blob[pos] ^= 0x01
    with pytest.raises(DecryptionError):
        box.decrypt(bytes(blob), aad=b"ctx")


def test_wrong_key_wrong_aad_truncated() -> None:
    box = SecretBox(os.urandom(32))
    blob = box.encrypt(b"secret", aad=b"user-1")
    with pytest.raises(DecryptionError):
        SecretBox(os.urandom(32)).decrypt(blob, aad=b"user-1")
    with pytest.raises(DecryptionError):
        box.decrypt(blob, aad=b"user-2")
    with pytest.raises(DecryptionError):
        box.decrypt(blob[:10])
    with pytest.raises(DecryptionError):
        box.decrypt(b"")
    with pytest.raises(ValueError):
        SecretBox(b"short")


def test_key_file_created_0600_and_reused(tmp_path) -> None:
    path = tmp_path / "var" / "sub" / "secret.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]     # no temp files left


def test_key_file_base64_accepted_and_bad_length_refused(tmp_path) -> None:
    raw = os.urandom(32)
    p = tmp_path / "k"
    p.write_text(base64.b64encode(raw).decode() + "\n")
    assert load_or_create_key(p) == raw
    p.write_bytes(b"too short")
    with pytest.raises(ValueError, match="32 random bytes"):
        load_or_create_key(p)


@pytest.mark.parametrize("cloud,authority,graph,scope", [
    ("global", "https://login.microsoftonline.com/contoso.com", "https://graph.microsoft.com/v1.0",
     "https://graph.microsoft.com/.default"),
    ("usgov", "https://login.microsoftonline.us/contoso.com", "https://graph.microsoft.us/v1.0",
     "https://graph.microsoft.us/.default"),
    ("usgov-dod", "https://login.microsoftonline.us/contoso.com", "https://dod-graph.microsoft.us/v1.0",
     "https://dod-graph.microsoft.us/.default"),
    ("china", "https://login.chinacloudapi.cn/contoso.com", "https://microsoftgraph.chinacloudapi.cn/v1.0",
     "https://microsoftgraph.chinacloudapi.cn/.default"),
])
def test_clouds(cloud: str, authority: str, graph: str, scope: str) -> None:
    ep = resolve_endpoints(cloud, "contoso.com")
    assert (ep.authority, ep.graph_url, ep.scopes) == (authority, graph, [scope])
    assert ep.is_microsoft_authority


def test_overrides_and_config() -> None:
    ep = endpoints_from_config(Office365Config(
        tenant="contoso.onmicrosoft.com", authority="https://127.0.0.1:8443/contoso.onmicrosoft.com/",
        graph_url="https://127.0.0.1:8443/v1.0/"))
    assert ep.authority == "https://127.0.0.1:8443/contoso.onmicrosoft.com"
    assert ep.graph_url == "https://127.0.0.1:8443/v1.0"
    assert ep.scope == "https://127.0.0.1:8443/.default"
    assert not ep.is_microsoft_authority
    ep = resolve_endpoints("china", "t", graph_url="https://proxy.example")
    assert ep.graph_url == "https://proxy.example/v1.0" and ep.authority == "https://login.chinacloudapi.cn/t"
    with pytest.raises(ValueError):
        resolve_endpoints("mars", "t")
    with pytest.raises(ValueError):
        resolve_endpoints("global", "")


def test_ca_bundle_adds_to_the_public_roots(tmp_path) -> None:
    from pathlib import Path

    import certifi

    from ldapsync.graph.tls import pem_blocks, trust_context, trusted_blocks
    from ldapsync.graph.token import make_requests_session

    import conftest  # type: ignore[import-not-found]

    ca, _, _ = conftest.make_cert(tmp_path / "tls")
    extra = pem_blocks(ca.read_bytes())
    public = pem_blocks(Path(certifi.where()).read_bytes())
    blocks = trusted_blocks(str(ca))
    assert blocks[-1] == extra[0] and len(blocks) == len(public) + 1
    # MSAL's context holds the same certificates, in memory (no CA file another user could plant)
    loaded = trust_context(str(ca)).get_ca_certs()
    assert len(loaded) == len(public) + 1
    assert ((("commonName", "ldapsync test CA"),),) in [c["subject"] for c in loaded]
    s = make_requests_session(str(ca))
    assert s.trust_env is False and s.verify is True


def test_queued_passwords_are_bound_to_their_user() -> None:
    box = SecretBox(os.urandom(32))
    blob = box.seal_password(b"Pass-1234", "uuid-ann")
    assert blob[:1] == b"\x02" and box.open_password(blob, "uuid-ann") == b"Pass-1234"
    for forged in (blob, b"\x01" + blob[1:]):        # another user's row; the version byte turned back
        with pytest.raises(DecryptionError):
            box.open_password(forged, "uuid-bob")
    with pytest.raises(DecryptionError):
        box.decrypt(blob)                             # version 2 needs its associated data
    # a row queued before version 2 (no associated data) is still delivered after the upgrade
    assert box.open_password(box.encrypt(b"Old-Pass-1"), "uuid-ann") == b"Old-Pass-1"
