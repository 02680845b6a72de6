"""The SMTP sink on its own, run as a separate process and driven by the stdlib's smtplib
(an independent client), reading what it stored from its maildir."""

from __future__ import annotations

import datetime as dt
import ipaddress
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ldapsync.testing.smtp_sink import read_maildir


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_p, key_p = directory / "cert.pem", directory / "key.pem"
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return cert_p, key_p


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> int:
        proc = subprocess.Popen([sys.executable, "-m", "ldapsync.testing.smtp_sink", "--port", "0", *args],
                                stdout=subprocess.PIPE, stderr=(tmp_path / "sink.log").open("ab"), text=True)
        procs.append(proc)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("smtp sink listening on 127.0.0.1:"), line
        return int(line.rsplit(":", 1)[1])

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = "a@example.com, b@example.com"
    msg["Subject"] = subject
    msg.set_content("Grüße\n.leading dot\n")
    return msg


def test_standalone_sink_stores_to_maildir_and_fails_on_request(start_sink, tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    port = start_sink("--maildir", str(maildir), "--fail-next", "1")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPDataError) as ei:
            s.send_message(message("first"))
        assert ei.value.smtp_code == 451
        s.send_message(message("second"), to_addrs=["a@example.com", "b@example.com"])
    (got,) = read_maildir(maildir)
    assert got.mail_from == "sender@example.com"
    assert got.rcpt_to == ["a@example.com", "b@example.com"]
    assert got.message["Subject"] == "second"
    assert got.body() == "Grüße\n.leading dot\n"
    assert got.auth_user is None and got.tls is False


def test_standalone_sink_with_starttls_and_auth(start_sink, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path / "tls")
    (tmp_path / "pw").write_text("s3cret\n")
    maildir = tmp_path / "mail"
    port = start_sink("--maildir", str(maildir), "--tls-cert", str(cert), "--tls-key", str(key), "--require-tls",
                      "--user", "mailer", "--password-file", str(tmp_path / "pw"))
    ctx = ssl.create_default_context(cafile=str(cert))
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls") and not s.has_extn("auth")
        with pytest.raises(smtplib.SMTPSenderRefused) as ei:
            s.send_message(message("too early"))
        assert ei.value.smtp_code == 530
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ctx)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("mailer", "wrong")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ctx)
        with pytest.raises(smtplib.SMTPSenderRefused) as ei:
            s.send_message(message("no auth"))
        assert ei.value.smtp_code == 530
    for mech in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.starttls(context=ctx)
            s.ehlo()
            s.user, s.password = "mailer", "s3cret"
            code, _ = s.auth(mech, getattr(s, f"auth_{mech.lower()}"))
            assert code == 235
            s.send_message(message(f"via {mech}"))
    got = read_maildir(maildir)
    assert [g.message["Subject"] for g in got] == ["via PLAIN", "via LOGIN"]
    assert all(g.auth_user == "mailer" and g.tls for g in got)
