"""``[ldap] processes``: its default (the CPUs this process may run on) and what is refused."""

from __future__ import annotations

import os

import pytest

from ldapsync.config import Config, ConfigError, from_json, load_config, to_json


def write(tmp_path, text: str):
    p = tmp_path / "ldapsync.toml"
    p.write_text(text)
    return p


def test_the_default_is_the_cpus_this_process_may_use(tmp_path):
    cfg = load_config(write(tmp_path, "[ldap]\n"))
    assert cfg.ldap.processes == len(os.sched_getaffinity(0)) >= 1
    assert load_config(write(tmp_path, "[ldap]\nprocesses = 1\n")).ldap.processes == 1
    assert load_config(write(tmp_path, "[ldap]\nprocesses = 16\n")).ldap.processes == 16


@pytest.mark.parametrize("value, says", [("0", "expected at least 1, got 0"),
                                         ("-2", "expected a non-negative whole number"),
                                         ('"4"', "expected a non-negative whole number"),
                                         ("true", "expected a non-negative whole number"),
                                         ("257", "expected at most 256, got 257")])
def test_nonsense_is_refused_naming_the_key(tmp_path, value, says):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"[ldap]\nprocesses = {value}\n"))
    assert "[ldap] processes" in str(e.value) and says in str(e.value)


def test_the_configuration_the_other_processes_get_is_the_servers(tmp_path):
    """What the server hands its LDAP processes on their stdin reads back equal (tuples, durations,
    resolved paths, the [mail] from key)."""
    cfg = load_config(write(tmp_path, '[ldap]\nprocesses = 3\nlisten = ["tcp:1389", "ssl:1636:privateKey=k.pem"]\n'
                                      '[mail]\nfrom = "dir@example.org"\n[admin]\npassword_file = "pw"\n'
                                      '[policy]\nmax_age = "30d"\n'))
    back = from_json(to_json(cfg))
    assert back == cfg and back.ldap.listen == ("tcp:1389", "ssl:1636:privateKey=k.pem")
    assert back.admin.password_file == str(tmp_path / "pw") and back.mail.from_ == "dir@example.org"
    assert from_json(to_json(Config())) == Config()
