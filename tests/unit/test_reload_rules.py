"""Which configuration changes a reload applies and which need a restart (``mxgate.core.reload``), and how the
socket-activation variables are taken (``mxgate.core.service``) — no sockets, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mxgate.core import bootstrap
from mxgate.core.config import Config
from mxgate.core.reload import restart_needed
from mxgate.core.service import inherited_sockets

BASE = """
[server]
hostname = "mx.example.org"
state_dir = "{state}"
receive_workers = 1
[[listener]]
name = "smtp"
address = "127.0.0.1:2525"
banner = "hello"
[[outbound_connector]]
name = "internet"
recipient_domains = ["*"]
use_mx = true
[dns]
resolvers = ["127.0.0.1:53"]
[metrics]
listen = "127.0.0.1:9925"
"""


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mxgate.toml"
    path.write_text(text.replace("{state}", str(tmp_path / "var")))
    config, _ = bootstrap.load(path, entry_points=False)
    return config


@pytest.mark.parametrize(
    ("old", "new", "needs"),
    [
        ('banner = "hello"', 'banner = "changed"', []),
        ("use_mx = true", "use_mx = true\nmx_port = 2526", []),
        ('address = "127.0.0.1:2525"', 'address = "127.0.0.1:2526"', ["listener[0].address"]),
        ("receive_workers = 1", "receive_workers = 2", ["server.receive_workers"]),
        ('resolvers = ["127.0.0.1:53"]', 'resolvers = ["127.0.0.1:5353"]', ["[dns]"]),
        ('listen = "127.0.0.1:9925"', 'listen = ""', ["[metrics]"]),
        ('name = "smtp"', 'name = "mx"', ["listener (names or order)"]),
    ],
)
def test_restart_needed(tmp_path: Path, old: str, new: str, needs: list[str]) -> None:
    before = load(tmp_path, BASE)
    after = load(tmp_path, BASE.replace(old, new, 1))
    assert restart_needed(before, after) == needs


def test_socket_activation_for_another_process_is_ignored_and_not_passed_on(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtp", "PATH": "/bin"}
    assert inherited_sockets(config, environ, pid=4242) == {}
    assert environ == {"PATH": "/bin"}  # removed: a receive worker must not take them
    environ = {"PATH": "/bin"}
    assert inherited_sockets(config, environ) == {} and environ == {"PATH": "/bin"}
