"""Client certificates at a certificate-pinned inbound connector (issue 18, item 7), against a real ``mxgate run``
with swaks as the client. Internet MTAs present client certificates from CAs we do not know: the handshake must
always complete; the certificate is verified afterwards and only decides whether the pinned connector
(``tls_sender_certificate_name`` + ``tls_client_ca``) matches.

Each client presents a certificate for the partner's own name, ``mail.partner.test``: from the partner's CA
(matches: may relay), from another CA, self-signed, expired (from the partner's CA), or none. All deliver to the
accepted domain; only the first may relay.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from reliability_kit import free_port, gateway_document, gateway_process, write_config

from mxgate.testing.ca import IssuedCert, TestCA, self_signed

pytestmark = [pytest.mark.integration]

PARTNER = "mail.partner.test"


def swaks(port: int, *args: str, to: str) -> tuple[int, str]:
    proc = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--from", "a@partner.test", "--to", to, "--timeout", "10",
         "--tls", *args],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")


def received_connectors(state: Path, n: int, timeout: float = 10.0) -> list[str]:
    """The connector of each RECEIVE event in the tracking log, once there are ``n`` of them (polled, bounded)."""
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < deadline:
        path = state / "tracking.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        found = [r.get("connector", "") for r in map(json.loads, lines) if r.get("event") == "RECEIVE"]
        if len(found) >= n:
            return found
        time.sleep(0.05)
    return found


def test_foreign_self_signed_and_expired_client_certificates_complete_the_handshake(tmp_path: Path) -> None:
    partner_ca = TestCA.create(tmp_path / "partner-ca")
    server_ca = TestCA.create(tmp_path / "server-ca")
    foreign_ca = TestCA.create(tmp_path / "foreign-ca")
    server = server_ca.issue(["mx.gateway.test"], directory=tmp_path / "server-ca")
    for d in ("self", "expired"):
        (tmp_path / d).mkdir()
    expired = datetime.now(UTC) - timedelta(days=2)
    clients: dict[str, IssuedCert | None] = {
        "partner": partner_ca.issue([PARTNER], client=True, directory=tmp_path / "partner-ca"),
        "foreign CA": foreign_ca.issue([PARTNER], client=True, directory=tmp_path / "foreign-ca"),
        "self-signed": self_signed(tmp_path / "self", [PARTNER], client=True),
        "expired": partner_ca.issue([PARTNER], client=True, not_after=expired, directory=tmp_path / "expired"),
        "none": None,
    }
    state = tmp_path / "var"
    port = free_port()
    doc = gateway_document(
        state,
        port=port,
        smart_host=f"127.0.0.1:{free_port()}",
        extra_listener={"tls_cert": str(server.chain_path), "tls_key": str(server.key_path)},
        extra_connector={"retry_first": 3600.0},
    )
    doc["inbound_connector"] = [
        {
            "name": "partner",
            "tls_sender_certificate_name": PARTNER,
            "tls_client_ca": str(partner_ca.cert_path),
            "may_relay": True,
        }
    ]
    config = write_config(tmp_path / "mxgate.toml", doc)
    outcomes: dict[str, str] = {}
    with gateway_process(config, port, tmp_path / "gw.log") as gw:
        for label, cert in clients.items():
            args = ("--tls-cert", str(cert.chain_path), "--tls-key", str(cert.key_path)) if cert else ()
            code, out = swaks(port, *args, to="someone@elsewhere.test")
            relay = "queued as" if "queued as" in out else ("550 5.7.1" if "550 5.7.1" in out else out[-600:])
            code, out = swaks(port, *args, to="user@example.org")
            assert code == 0 and "queued as" in out, f"{label}: {out[-1500:]}\n{gw.tail()}"
            outcomes[label] = relay
        connectors = received_connectors(state, 1 + len(clients))
    print(f"\nclient certificates at a pinned connector: relay {outcomes}")
    print(f"connectors of the messages received: {connectors}")
    assert outcomes["partner"] == "queued as"
    for label in ("foreign CA", "self-signed", "expired", "none"):
        assert outcomes[label] == "550 5.7.1", (label, outcomes[label])
    # partner: relayed + local (both through its connector); the others: one local message each, anonymous
    assert connectors == ["partner", "partner"] + ["anonymous"] * 4, connectors
