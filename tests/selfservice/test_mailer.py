"""The mailer against a real SMTP sink on loopback: plain, STARTTLS, AUTH, MIME, retries.

Everything runs on the reactor pytest-twisted drives; backoff waits run on a ``task.Clock``
that the tests advance, so no test sleeps through a real backoff.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from ldapsync.config import MailConfig
from ldapsync.mail import Mailer, MailError, _Sender
from ldapsync.testing.smtp_sink import SMTPSink

PASSWORD = "pa55-W0rd!unique-7c1e"
ACTIVATION = "https://selfservice.example.com/activate?token=SECRET-TOKEN-42"


# ---------------------------------------------------------------------------- fixtures


def _self_signed(directory: Path, cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert.pem, key.pem)."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_p, key_p = directory / "cert.pem", directory / "key.pem"
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return cert_p, key_p


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _self_signed(tmp_path_factory.mktemp("other-ca"))[0]


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    p = tmp_path / "smtp-password"
    p.write_text(PASSWORD + "\n")
    return p


@pytest.fixture
def sinks() -> Iterator[list[SMTPSink]]:
    made: list[SMTPSink] = []
    yield made
    for s in made:
        pytest_twisted.blockon(s.stop())


@pytest.fixture
def sink(sinks: list[SMTPSink]) -> SMTPSink:
    s = SMTPSink().start()
    sinks.append(s)
    return s


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log event during the test, formatted and as its raw dict, as text."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{formatEvent(event)} {event!r}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def mailer(endpoint: str, clock: task.Clock | None = None, **kw: Any) -> Mailer:
    cfg_keys = {k: kw.pop(k) for k in ("starttls", "username", "password_file") if k in kw}
    cfg = MailConfig(smtp=endpoint, from_="ldapsync <ldapsync@example.com>", **cfg_keys)
    return Mailer(cfg, scheduler=clock or task.Clock(), **kw)


async def run_with_clock(clock: task.Clock, d: defer.Deferred[Any]) -> list[float]:
    """Drive ``d`` to completion: whenever the mailer waits on ``clock``, jump to the end of
    that wait.  Returns the waits seen (the backoff schedule)."""
    waits: list[float] = []
    while not d.called:
        calls = clock.getDelayedCalls()
        if calls:
            delay = min(c.getTime() for c in calls) - clock.seconds()
            waits.append(delay)
            clock.advance(delay)
        else:
            await deferLater(reactor, 0.005, lambda: None)
    return waits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- plain


@pytest_twisted.ensureDeferred
async def test_plain_send_builds_a_proper_message(sink: SMTPSink) -> None:
    m = mailer(sink.endpoint)
    await m.send("alice@example.com", "Welcome", "Hello Alice\n", headers={"Reply-To": "it@example.com"})
    (got,) = await sink.wait_for(1)
    assert got.mail_from == "ldapsync@example.com"
    assert got.rcpt_to == ["alice@example.com"]
    assert got.tls is False and got.auth_user is None
    msg = got.message
    assert msg["From"] == "ldapsync <ldapsync@example.com>"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Welcome"
    assert msg["Reply-To"] == "it@example.com"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Date"].datetime is not None
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@example.com>")
    assert msg.get_content_type() == "text/plain"
    assert got.body() == "Hello Alice\n"
    assert sink.sessions == 1


@pytest_twisted.ensureDeferred
async def test_several_recipients_and_message_ids_differ(sink: SMTPSink) -> None:
    m = mailer(sink.endpoint)
    await m.send(["a@example.com", "Bob <b@example.com>"], "one", "x")
    await m.send("a@example.com", "two", "y")
    first, second = await sink.wait_for(2)
    assert first.rcpt_to == ["a@example.com", "b@example.com"]
    assert first.message["To"] == "a@example.com, Bob <b@example.com>"
    assert first.message["Message-ID"] != second.message["Message-ID"]


@pytest_twisted.ensureDeferred
async def test_multipart_alternative_when_html(sink: SMTPSink) -> None:
    m = mailer(sink.endpoint)
    await m.send("a@example.com", "Activate", f"Open {ACTIVATION}\n", f'<p><a href="{ACTIVATION}">Activate</a></p>')
    (got,) = await sink.wait_for(1)
    assert got.message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in got.message.iter_parts()] == ["text/plain", "text/html"]
    assert got.body("plain") == f"Open {ACTIVATION}\n"
    assert ACTIVATION in got.body("html")


@pytest_twisted.ensureDeferred
async def test_non_ascii_subject_names_and_body(sink: SMTPSink) -> None:
    m = Mailer(MailConfig(smtp=sink.endpoint, from_="Službа ІТ — Mañana <it@example.com>"), scheduler=task.Clock())
    subject = "Grüße, Jörg — ваш пароль 🔑 " + "très long " * 12
    await m.send("Jörg Müller <joerg@example.com>", subject, "Passwort geändert: ✓\n", "<p>geändert ✓</p>")
    (got,) = await sink.wait_for(1)
    raw_headers = got.raw.split(b"\n\n", 1)[0]
    raw_headers.decode("ascii")  # headers are RFC 2047 encoded on the wire
    assert all(len(line) <= 998 for line in raw_headers.split(b"\n"))
    assert got.message["Subject"] == subject
    assert got.message["To"].addresses[0].display_name == "Jörg Müller"
    assert got.message["From"].addresses[0].display_name == "Službа ІТ — Mañana"
    assert got.body() == "Passwort geändert: ✓\n"
    assert "geändert ✓" in got.body("html")


@pytest_twisted.ensureDeferred
async def test_lines_starting_with_a_dot_survive_at_any_chunk_boundary(sink: SMTPSink) -> None:
    m = mailer(sink.endpoint)
    # > 16 KiB of ".\n": FileSender's first chunk boundary falls before a "." in exactly one of
    # the two (same header lengths but for the one-character longer subject)
    text = ".\n" * 12000 + ".end\n"
    await m.send("a@example.com", "dots", text, headers={"Message-ID": "<dots-1@example.com>"})
    await m.send("a@example.com", "dots!", text, headers={"Message-ID": "<dots-2@example.com>"})
    for got in await sink.wait_for(2):
        assert got.body() == text


def test_dot_stuffing_across_chunks_unit() -> None:
    p = _Sender(None, None, None, b"client.test")
    chunks = [b"a\n", b".b\n.", b"c\n", b"..\n"]
    wire = b"".join(p.transformChunk(c) for c in chunks)
    assert wire == b"a\r\n..b\r\n..c\r\n...\r\n"


def test_bad_input_is_refused_before_sending() -> None:
    m = mailer("tcp:127.0.0.1:1")
    with pytest.raises(ValueError):
        m.build_message("not an address", "s", "t")
    with pytest.raises(ValueError):
        m.build_message("a@example.com", "evil\r\nBcc: x@example.com", "t")
    with pytest.raises(ValueError):
        m.build_message("a@example.com", "s", "t", headers={"X-A": "1\nBcc: x@example.com"})
    with pytest.raises(ValueError):
        m.build_message([], "s", "t")


# ---------------------------------------------------------------------------- STARTTLS


@pytest_twisted.ensureDeferred
async def test_starttls_required_and_verified_with_ca_bundle(sinks: list[SMTPSink], tls: tuple[Path, Path]) -> None:
    sink = SMTPSink(tls_cert=tls[0], tls_key=tls[1], require_tls=True).start()
    sinks.append(sink)
    m = mailer(sink.endpoint, starttls=True, ca_bundle=str(tls[0]))
    await m.send("a@example.com", "over tls", "secret link\n")
    (got,) = await sink.wait_for(1)
    assert got.tls is True


@pytest_twisted.ensureDeferred
async def test_starttls_required_but_not_offered_refuses_to_send(sink: SMTPSink, tls: tuple[Path, Path],
                                                                 log_lines: list[str]) -> None:
    clock = task.Clock()
    m = mailer(sink.endpoint, clock, starttls=True, ca_bundle=str(tls[0]))
    with pytest.raises(MailError, match="STARTTLS") as ei:
        await m.send("a@example.com", "must be private", f"{ACTIVATION}\n")
    assert ei.value.transient is False
    assert sink.messages == [] and sink.sessions == 1  # not retried
    assert not clock.getDelayedCalls()
    assert not any("SECRET-TOKEN" in line for line in log_lines)


@pytest_twisted.ensureDeferred
async def test_starttls_with_an_untrusted_certificate_fails(sinks: list[SMTPSink], tls: tuple[Path, Path],
                                                            other_ca: Path) -> None:
    sink = SMTPSink(tls_cert=tls[0], tls_key=tls[1]).start()
    sinks.append(sink)
    m = mailer(sink.endpoint, starttls=True, ca_bundle=str(other_ca))
    with pytest.raises(MailError, match="TLS"):
        await m.send("a@example.com", "s", "t")
    assert sink.messages == [] and sink.sessions == 1


@pytest_twisted.ensureDeferred
async def test_starttls_not_configured_sends_in_clear_even_if_offered(sinks: list[SMTPSink],
                                                                      tls: tuple[Path, Path]) -> None:
    sink = SMTPSink(tls_cert=tls[0], tls_key=tls[1]).start()
    sinks.append(sink)
    await mailer(sink.endpoint).send("a@example.com", "s", "t")
    (got,) = await sink.wait_for(1)
    assert got.tls is False


# ---------------------------------------------------------------------------- AUTH


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest_twisted.ensureDeferred
async def test_auth_with_the_right_password(sinks: list[SMTPSink], tls: tuple[Path, Path], password_file: Path,
                                            mechanism: str, log_lines: list[str]) -> None:
    sink = SMTPSink(tls_cert=tls[0], tls_key=tls[1], require_tls=True, credentials={"mailer": PASSWORD},
                    auth_mechanisms=(mechanism,)).start()
    sinks.append(sink)
    m = mailer(sink.endpoint, starttls=True, ca_bundle=str(tls[0]), username="mailer",
               password_file=str(password_file))
    await m.send("a@example.com", "authenticated", f"{ACTIVATION}\n")
    (got,) = await sink.wait_for(1)
    assert got.auth_user == "mailer" and got.tls is True
    text = "\n".join(log_lines)
    assert PASSWORD not in text and "SECRET-TOKEN" not in text
    assert "a@example.com" in text and "authenticated" in text  # recipient and subject are logged


@pytest_twisted.ensureDeferred
async def test_auth_with_a_wrong_password(sinks: list[SMTPSink], tls: tuple[Path, Path], tmp_path: Path,
                                          log_lines: list[str]) -> None:
    sink = SMTPSink(tls_cert=tls[0], tls_key=tls[1], require_tls=True, credentials={"mailer": "the-right-one"}).start()
    sinks.append(sink)
    wrong = tmp_path / "pw"
    wrong.write_text(PASSWORD + "\n")
    clock = task.Clock()
    m = mailer(sink.endpoint, clock, starttls=True, ca_bundle=str(tls[0]), username="mailer", password_file=str(wrong))
    with pytest.raises(MailError) as ei:
        await m.send("a@example.com", "s", f"{ACTIVATION}\n")
    assert "authentication failed" in str(ei.value) and "535" in str(ei.value)
    assert ei.value.code == 535 and ei.value.transient is False
    assert PASSWORD not in str(ei.value) and PASSWORD not in repr(ei.value.args)
    assert ei.value.__cause__ is None and ei.value.__context__ is None
    assert sink.messages == [] and sink.sessions == 1  # 5xx: not retried
    text = "\n".join(log_lines)
    assert PASSWORD not in text and "SECRET-TOKEN" not in text
    import base64
    assert base64.b64encode(PASSWORD.encode()).decode()[:16] not in text


def test_auth_without_tls_is_refused_before_any_connection(tmp_path: Path, password_file: Path) -> None:
    """A username without STARTTLS (or an implicit-TLS tls: endpoint) would send the password in
    clear: the Mailer refuses to exist, and the server refuses the config at start."""
    from ldapsync.config import ConfigError, load_config

    with pytest.raises(MailError, match="in clear.*starttls = true"):
        mailer("tcp:127.0.0.1:25", username="mailer", password_file=str(password_file))
    mailer("tcp:127.0.0.1:25", starttls=True, username="mailer", password_file=str(password_file))
    mailer("tls:127.0.0.1:465", username="mailer", password_file=str(password_file))
    mailer("tcp:127.0.0.1:25")                                      # no AUTH: clear is allowed
    cfg = tmp_path / "ldapsync.toml"
    cfg.write_text(f'[mail]\nsmtp = "tcp:smtp.example.com:587"\nusername = "mailer"\npassword_file = "{password_file}"\n')
    with pytest.raises(ConfigError, match=r"\[mail\] username is set but the connection is not encrypted"):
        load_config(cfg)
    cfg.write_text(cfg.read_text() + "starttls = true\n")
    assert load_config(cfg).mail.starttls


@pytest_twisted.ensureDeferred
async def test_auth_required_by_server_but_not_configured(sinks: list[SMTPSink]) -> None:
    sink = SMTPSink(credentials={"mailer": "x"}).start()
    sinks.append(sink)
    with pytest.raises(MailError, match="530"):
        await mailer(sink.endpoint).send("a@example.com", "s", "t")
    assert sink.sessions == 1


@pytest_twisted.ensureDeferred
async def test_missing_password_file_is_a_clear_error(sink: SMTPSink, tmp_path: Path) -> None:
    m = mailer(sink.endpoint, starttls=True, username="mailer", password_file=str(tmp_path / "nope"))
    with pytest.raises(MailError, match="password_file"):
        await m.send("a@example.com", "s", "t")
    assert sink.sessions == 0


# ---------------------------------------------------------------------------- retries


@pytest_twisted.ensureDeferred
async def test_451_then_success_retries_with_backoff(sink: SMTPSink) -> None:
    clock = task.Clock()
    m = mailer(sink.endpoint, clock, attempts=4, base_delay=5.0)
    sink.fail_next(2, 451)
    d = defer.ensureDeferred(m.send("a@example.com", "eventually", "t"))
    waits = await run_with_clock(clock, d)
    await d
    assert waits == [5.0, 10.0]
    assert sink.sessions == 3
    assert [g.message["Subject"] for g in sink.messages] == ["eventually"]


@pytest_twisted.ensureDeferred
async def test_transient_failures_exhaust_the_attempts(sink: SMTPSink) -> None:
    clock = task.Clock()
    m = mailer(sink.endpoint, clock, attempts=3, base_delay=2.0)
    sink.fail_next(5, 421, "Service not available")
    d = defer.ensureDeferred(m.send("a@example.com", "never", "t"))
    waits = await run_with_clock(clock, d)
    with pytest.raises(MailError, match="after 3 attempts.*421") as ei:
        await d
    assert ei.value.transient is True and ei.value.code == 421
    assert waits == [2.0, 4.0] and sink.sessions == 3 and sink.messages == []


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_retried_then_reported() -> None:
    clock = task.Clock()
    m = mailer(f"tcp:127.0.0.1:{free_port()}", clock, attempts=3, base_delay=1.0, max_delay=1.5)
    d = defer.ensureDeferred(m.send("a@example.com", "s", "t"))
    waits = await run_with_clock(clock, d)
    with pytest.raises(MailError, match="refused"):
        await d
    assert waits == [1.0, 1.5]  # capped by max_delay


@pytest_twisted.ensureDeferred
async def test_550_is_not_retried(sink: SMTPSink) -> None:
    clock = task.Clock()
    m = mailer(sink.endpoint, clock)
    sink.fail_next(1, 550, "Mailbox unavailable")
    with pytest.raises(MailError, match="550 Mailbox unavailable") as ei:
        await m.send("a@example.com", "s", "t")
    assert ei.value.code == 550 and not ei.value.transient
    assert sink.sessions == 1 and not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_refused_recipient_4xx_is_retried_for_that_recipient_only(sink: SMTPSink) -> None:
    clock = task.Clock()
    m = mailer(sink.endpoint, clock)
    sink.fail_next(1, 450, "Mailbox busy", stage="rcpt")  # the first RCPT only
    d = defer.ensureDeferred(m.send(["a@example.com", "b@example.com"], "s", "t"))
    await run_with_clock(clock, d)
    await d
    assert [g.rcpt_to for g in sink.messages] == [["b@example.com"], ["a@example.com"]]


@pytest_twisted.ensureDeferred
async def test_refused_recipient_5xx_raises_after_delivering_to_the_others(sink: SMTPSink) -> None:
    m = mailer(sink.endpoint)
    sink.fail_next(1, 550, "No such user", stage="rcpt")
    with pytest.raises(MailError, match="a@example.com.*550 No such user"):
        await m.send(["a@example.com", "b@example.com"], "s", "t")
    assert [g.rcpt_to for g in sink.messages] == [["b@example.com"]]


# ---------------------------------------------------------------------------- send_later


@pytest_twisted.ensureDeferred
async def test_send_later_retries_in_the_background(sink: SMTPSink) -> None:
    clock = task.Clock()
    m = mailer(sink.endpoint, clock)
    sink.fail_next(1, 451)
    d = m.send_later("a@example.com", "later", "t")
    assert m.queued == 1
    await run_with_clock(clock, d)
    await m.wait_idle()
    assert m.queued == 0
    assert [g.message["Subject"] for g in sink.messages] == ["later"]


@pytest_twisted.ensureDeferred
async def test_send_later_logs_the_final_failure_without_raising(sink: SMTPSink, log_lines: list[str]) -> None:
    clock = task.Clock()
    m = mailer(sink.endpoint, clock, background_attempts=2, base_delay=1.0)
    sink.fail_next(5, 451, "Greylisted")
    d = m.send_later("bob@example.com", "Your activation link", f"{ACTIVATION}\n", f"<a href='{ACTIVATION}'>x</a>")
    await run_with_clock(clock, d)
    assert await d is None
    text = "\n".join(log_lines)
    assert "bob@example.com" in text and "Your activation link" in text and "451 Greylisted" in text
    assert "SECRET-TOKEN" not in text
    assert sink.sessions == 2 and m.queued == 0


@pytest_twisted.ensureDeferred
async def test_stop_cancels_queued_mail() -> None:
    clock = task.Clock()
    m = mailer(f"tcp:127.0.0.1:{free_port()}", clock)
    d = m.send_later("a@example.com", "s", "t")
    while not clock.getDelayedCalls():  # first attempt refused, now waiting to retry
        await deferLater(reactor, 0.005, lambda: None)
    m.stop()
    assert await d is None
    assert m.queued == 0
    with pytest.raises(MailError):
        m.send_later("a@example.com", "s", "t")
