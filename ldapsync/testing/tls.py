"""Certificates for the fake Microsoft 365 tenant (test double only).

Owns: a throw-away certificate authority and a server certificate for 127.0.0.1/localhost, the
Twisted server TLS options built from them, client-side helpers that trust that CA (a `requests`
session for MSAL, a treq/Agent TLS policy), and self-signed app certificates for the
client-assertion grant. Production code must not import this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_PEM = serialization.Encoding.PEM


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class ServerCertificates:
    """PEM files of the fake's CA and server certificate, in ``directory``."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_options(self):  # -> twisted.internet.ssl.CertificateOptions
        from twisted.internet import ssl

        ca = ssl.Certificate.loadPEM(self.ca_file.read_bytes())
        leaf = ssl.PrivateCertificate.loadPEM(
            self.cert_file.read_bytes() + self.key_file.read_bytes())
        return ssl.CertificateOptions(
            privateKey=leaf.privateKey.original, certificate=leaf.original,
            extraCertChain=[ca.original])


def ensure_server_certificates(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
                               ) -> ServerCertificates:
    """Create (or reuse, if present) ``ca.pem``, ``server.pem`` and ``server.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    files = ServerCertificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if files.ca_file.exists() and files.cert_file.exists() and files.key_file.exists():
        return files
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ldapsync fake tenant test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files.key_file.write_bytes(_key_pem(key))
    files.key_file.chmod(0o600)
    files.cert_file.write_bytes(cert.public_bytes(_PEM))
    files.ca_file.write_bytes(ca_cert.public_bytes(_PEM))
    return files


@dataclass(frozen=True)
class AppCertificate:
    """A self-signed RSA certificate an app registration can use for client assertions."""

    private_key_pem: str
    certificate_pem: str
    sha1_thumbprint: str      # hex, what MSAL's ``thumbprint`` wants
    sha256_thumbprint: str    # hex
    not_after: dt.datetime

    def msal_credential(self, *, sha256: bool = False) -> dict[str, str]:
        """``client_credential`` for MSAL: SHA-1 ``thumbprint`` (RS256), or the cert (PS256)."""
        if sha256:
            return {"private_key": self.private_key_pem, "public_certificate": self.certificate_pem}
        return {"private_key": self.private_key_pem, "thumbprint": self.sha1_thumbprint}


def make_app_certificate(common_name: str = "ldapsync", days: int = 365) -> AppCertificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return AppCertificate(
        private_key_pem=_key_pem(key).decode(),
        certificate_pem=cert.public_bytes(_PEM).decode(),
        sha1_thumbprint=hashlib.sha1(der).hexdigest().upper(),  # noqa: S324 - x5t is SHA-1
        sha256_thumbprint=hashlib.sha256(der).hexdigest().upper(),
        not_after=cert.not_valid_after_utc,
    )


# --- client side -----------------------------------------------------------------------------

def requests_session(ca_file: str | Path):
    """A ``requests.Session`` trusting only ``ca_file`` and ignoring REQUESTS_CA_BUNDLE & co."""
    import requests

    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_file)
    return session


def client_tls_policy(ca_file: str | Path):
    """A Twisted ``IPolicyForHTTPS`` for ``Agent``/treq that trusts ``ca_file``."""
    from twisted.internet import ssl
    from twisted.web.client import BrowserLikePolicyForHTTPS

    return BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(Path(ca_file).read_bytes()))


def treq_client(ca_file: str | Path, reactor=None, persistent: bool = True):
    """A ``treq.client.HTTPClient`` whose HTTPS connections trust ``ca_file``."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    agent = Agent(reactor, contextFactory=client_tls_policy(ca_file), pool=pool)
    return HTTPClient(agent)  # type: ignore[arg-type]
