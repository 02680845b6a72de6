"""ldapsync.logs: JSON lines parse, carry the fields, and the level filter drops what it should."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher

from ldapsync import logs


def _logger(level: str, fmt: str) -> tuple[Logger, io.StringIO]:
    out = io.StringIO()
    pub = LogPublisher(logs.make_observer(level, fmt, out))
    return Logger(namespace="ldapsync.test", observer=pub), out


def test_json_lines_have_time_level_system_message_and_fields() -> None:
    log, out = _logger("info", "json")
    log.info("bind of {dn} failed: {reason}", dn="uid=bob,ou=people,dc=example,dc=com", reason="wrong password", code=49)
    log.warn("connector {state}", state="error", obj=object())
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info" and first["system"] == "ldapsync.test"
    assert first["message"] == "bind of uid=bob,ou=people,dc=example,dc=com failed: wrong password"
    assert first["dn"] == "uid=bob,ou=people,dc=example,dc=com" and first["code"] == 49
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["level"] == "warn" and isinstance(second["obj"], str)


def test_level_filter() -> None:
    log, out = _logger("warn", "json")
    log.debug("debug line")
    log.info("info line")
    log.warn("warn line")
    log.error("error line")
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["warn line", "error line"]
    log, out = _logger("debug", "text")
    log.debug("debug line")
    assert "debug line" in out.getvalue()


def test_failure_is_one_line_with_the_traceback() -> None:
    log, out = _logger("info", "json")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it broke")
    (line,) = out.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["level"] == "critical" and "ZeroDivisionError" in rec["failure"]


def test_log_section_is_validated(tmp_path) -> None:
    import pytest

    from ldapsync.config import ConfigError, load_config

    cfg = tmp_path / "ldapsync.toml"
    cfg.write_text('[log]\nlevel = "warn"\nformat = "json"\naccess = true\nfile = "var/ldapsync.log"\n')
    got = load_config(cfg).log
    # a relative path in a config file is the file's own (docs/configuration.md)
    assert (got.level, got.format, got.access, got.file) == ("warn", "json", True, str(tmp_path / "var/ldapsync.log"))
    assert load_config(None).log.level == "info"
    for text, message in [('level = "verbose"', '[log] level: expected "debug", "info", "warn", "error" or "critical"'),
                          ('format = "xml"', '[log] format: expected "text" or "json"'),
                          ('access = "yes"', "[log] access: expected true or false"),
                          ('colour = 1', "[log]: unknown key(s) colour")]:
        cfg.write_text(f"[log]\n{text}\n")
        with pytest.raises(ConfigError) as e:
            load_config(cfg)
        assert message in str(e.value), str(e.value)


def test_a_bad_duration_names_every_unit(tmp_path) -> None:
    """The README uses "90d": the message must list every unit a duration may have."""
    import pytest

    from ldapsync.config import ConfigError, load_config

    path = tmp_path / "ldapsync.toml"
    path.write_text('[policy]\nmax_age = "3 weeks"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "ms, s, m, h or d" in str(e.value), str(e.value)
    assert "[policy] max_age" in str(e.value) and "'3 weeks'" in str(e.value)


def test_public_url_follows_the_pages_listen_address(tmp_path) -> None:
    """Moving the pages to another port without setting public_url keeps their forms working: the
    default is where they listen (it used to stay http://127.0.0.1:8080, and every form failed)."""
    from ldapsync.config import load_config

    path = tmp_path / "ldapsync.toml"
    path.write_text('[selfservice]\nlisten = "tcp:9191:interface=127.0.0.2"\n')
    assert load_config(path).selfservice.public_url == "http://127.0.0.2:9191"
    path.write_text('[selfservice]\nlisten = "ssl:8443:privateKey=k.pem:certKey=c.pem"\n')
    assert load_config(path).selfservice.public_url == "https://127.0.0.1:8443"
    path.write_text('[selfservice]\nlisten = "tcp:9191"\npublic_url = "https://account.example.com"\n')
    assert load_config(path).selfservice.public_url == "https://account.example.com"
    path.write_text('[selfservice]\nlisten = ""\n')
    assert load_config(path).selfservice.public_url == ""
