"""``mxgate check`` (preflight) against the DNS lab: a gateway that is ready passes; one with every kind of
problem gets one line per problem (and exit 1), each naming what to fix."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mxgate.core.cli import main
from mxgate.core.dns import Resolver
from mxgate.core.dns_answers import DnssecStatus
from mxgate.plugins.dane import make_tlsa
from mxgate.testing.ca import IssuedCert, TestCA
from mxgate.testing.dnslab import DnsLab, DnsLabError
from mxgate.testing.gateway import free_port

pytestmark = pytest.mark.integration

ZONE = "preflight.test"
MX = f"mx.{ZONE}"
BOGUS = "bogus-preflight.test"


@dataclass
class Lab:
    lab: DnsLab
    port: int  # the listener port our TLSA records are published for
    served: IssuedCert  # covered by the TLSA record
    stranger: IssuedCert  # not covered
    expiring: IssuedCert  # covered, expires in 3 days


def warm_up(lab: DnsLab) -> None:
    """Bounded wait until unbound validates (its first answers after start can SERVFAIL)."""

    async def ready() -> bool:
        resolver = Resolver([lab.endpoint], timeout=1.0)
        ok = await resolver.resolve(ZONE, "MX", use_cache=False)
        bad = await resolver.resolve(BOGUS, "A", use_cache=False)
        return ok.is_secure and bad.status is DnssecStatus.BOGUS

    for _ in range(100):
        if asyncio.run(ready()):
            return
        time.sleep(0.1)
    pytest.fail("the DNS lab does not validate", pytrace=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("preflight")
    port = free_port()
    ca = TestCA.create(work / "ca")
    served, stranger = (ca.issue([MX], directory=work / "certs") for _ in range(2))
    expiring = ca.issue([MX], directory=work / "certs", not_after=datetime.now(UTC) + timedelta(days=3))
    dns = DnsLab(work / "dns")
    z = dns.zone(ZONE)
    z.add("@", "MX", "10 mx").add("@", "MX", "20 backup").add("mx", "A", "127.0.2.1").add("backup", "A", "127.0.2.2")
    z.add(f"_{port}._tcp.mx", "TLSA", make_tlsa(served.cert).text)
    z.add(f"_{port}._tcp.mx", "TLSA", make_tlsa(expiring.cert).text)
    dns.zone(BOGUS, corrupt="signature").add("@", "A", "127.0.0.98")
    try:
        dns.start()
    except DnsLabError as exc:
        pytest.fail(f"DNS lab could not start: {exc}", pytrace=False)
    try:
        warm_up(dns)
        yield Lab(dns, port, served, stranger, expiring)
    finally:
        dns.stop()


def write_config(
    path: Path,
    lab: Lab,
    cert: IssuedCert,
    *,
    metrics: int,
    mx_patterns: tuple[str, ...],
    bogus: str = BOGUS,
    key: Path | None = None,
) -> Path:
    state = path.parent / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    path.write_text(
        f"""
[server]
hostname = "{MX}"
state_dir = "{state}"
accepted_domains = ["{ZONE}"]
[[listener]]
name = "smtp"
address = "127.0.0.1:{lab.port}"
tls_cert = "{cert.chain_path}"
tls_key = "{key or cert.key_path}"
[[outbound_connector]]
name = "internet"
recipient_domains = ["*"]
use_mx = true
[dns]
resolvers = ["{lab.lab.endpoint}"]
timeout = 2.0
self_test_secure = "{ZONE}"
self_test_bogus = "{bogus}"
[metrics]
listen = "127.0.0.1:{metrics}"
[plugins.mta_sts]
[[plugins.mta_sts.serve_policies]]
domain = "{ZONE}"
mode = "enforce"
mx = {list(mx_patterns)!r}
""".replace("'", '"')
    )
    return path


def check(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, list[str]]:
    code = main(["check", "-c", str(config)])
    out = capsys.readouterr().out
    return code, out.strip().splitlines()


def test_a_ready_gateway_passes(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path / "mxgate.toml", lab, lab.served, metrics=free_port(), mx_patterns=(MX, f"backup.{ZONE}")
    )
    code, lines = check(capsys, config)
    assert (code, lines) == (0, [f"mxgate check: {config} is ready to run"])


def test_every_problem_is_one_line(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    config = write_config(
        tmp_path / "mxgate.toml",
        lab,
        lab.stranger,  # not covered by our TLSA records
        metrics=busy.getsockname()[1],  # taken
        mx_patterns=(f"*.other.{ZONE}", MX),  # backup.preflight.test is missing; we are in
        bogus=ZONE,  # a secure name as the "bogus" one: the self-test says the resolver does not validate
    )
    state = tmp_path / "state"
    state.chmod(0o755)
    (state / "leak.txt").write_text("x")
    os.chmod(state / "leak.txt", 0o644)
    try:
        code, lines = check(capsys, config)
    finally:
        busy.close()
    assert code == 1
    body, summary = lines[:-1], lines[-1]
    assert summary == f"mxgate check: {len(body)} problem(s) in {config}"
    wants = [
        ("state directory", "mode 0755"),
        ("state directory", "leak.txt (0644)"),
        ("metrics.listen", "in use"),
        ("dns.resolvers", "does not validate"),
        (f"TLSA _{lab.port}._tcp.{MX}", str(lab.stranger.chain_path)),
        ("serve_policies[0]", f"MX backup.{ZONE} matches none"),
    ]
    for head, detail in wants:
        assert [line for line in body if head in line and detail in line], (head, detail, body)
    assert len(body) == len(wants), body


def test_certificate_problems(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # expiring within the margin
    config = write_config(tmp_path / "a.toml", lab, lab.expiring, metrics=free_port(), mx_patterns=(f"*.{ZONE}",))
    code, lines = check(capsys, config)
    assert code == 1 and len(lines) == 2, lines
    assert "listener smtp" in lines[0] and str(lab.expiring.chain_path) in lines[0] and "expires in" in lines[0]
    assert main(["check", "--days", "2", "-c", str(config)]) == 0
    capsys.readouterr()
    # a key that belongs to another certificate: config check and run refuse it too (one line naming the file)
    config = write_config(
        tmp_path / "b.toml", lab, lab.served, metrics=free_port(), mx_patterns=(f"*.{ZONE}",), key=lab.stranger.key_path
    )
    code = main(["config", "check", str(config)])
    err = capsys.readouterr().err
    assert code == 1 and "does not match the certificate" in err and str(lab.stranger.key_path) in err
    assert main(["check", "-c", str(config)]) == 1


@pytest.mark.parametrize("case", ["garbage", "unreadable", "expired"])
def test_config_check_refuses_what_run_cannot_serve(
    case: str, lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 23's stumble: `config check` passed these, and `run` died with a traceback that never named the file."""
    cert, key = tmp_path / "mx.pem", tmp_path / "mx.key"
    cert.write_bytes(lab.served.chain_path.read_bytes())
    key.write_bytes(lab.served.key_path.read_bytes())
    if case == "garbage":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        named = cert
    elif case == "unreadable":
        if os.geteuid() == 0:
            key.unlink()
            key.mkdir()  # root reads any file; a directory is unreadable as a key to anyone
        else:
            key.chmod(0)
        named = key
    else:
        expired = TestCA.create(tmp_path / "ca").issue([MX], not_after=datetime.now(UTC) - timedelta(days=1))
        cert.write_bytes(expired.chain_path.read_bytes())
        key.write_bytes(expired.key_path.read_bytes())
        named = cert
    config = tmp_path / "mxgate.toml"
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nlisten = ""\n'
        f'[[listener]]\nname = "smtp"\naddress = "127.0.0.1:{free_port()}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    )
    assert main(["config", "check", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and str(named) in err[0], err
