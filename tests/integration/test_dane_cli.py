"""``mxgate dane tlsa | check-inbound | explain``: in the DNS lab, against a real SMTP sink with lab certificates."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mxgate.core.cli import main
from mxgate.plugins.dane import make_tlsa
from mxgate.testing.ca import IssuedCert, TestCA
from mxgate.testing.dnslab import DnsLab, DnsLabError
from mxgate.testing.sinks import ThreadedSmtpSink

pytestmark = pytest.mark.integration

ZONE = "inbound.test"
MX = f"mx.{ZONE}"
MX_IP = "127.0.2.1"
MX2 = f"mx2.{ZONE}"  # publishes a record for a certificate it does not serve
MX2_IP = "127.0.2.2"


@dataclass
class CliLab:
    lab: DnsLab
    port: int
    config: Path
    current: IssuedCert
    published_next: IssuedCert
    unpublished_next: IssuedCert
    stranger: IssuedCert


@pytest.fixture(scope="module")
def cli_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliLab]:
    workdir = tmp_path_factory.mktemp("dane-cli")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ca = TestCA.create(workdir / "ca")
    current, published_next, unpublished_next, stranger = (
        ca.issue([MX], directory=workdir / "certs") for _ in range(4)
    )
    lab = DnsLab(workdir / "dns")
    z = lab.zone(ZONE)
    z.add("@", "MX", "10 mx").add("mx", "A", MX_IP).add("mx2", "A", MX2_IP)
    z.add(f"_{port}._tcp.mx", "TLSA", make_tlsa(current.cert).text)
    z.add(f"_{port}._tcp.mx", "TLSA", make_tlsa(published_next.cert).text)
    z.add(f"_{port}._tcp.mx", "TLSA", make_tlsa(current.cert, 1, 1, 1).text)  # unusable for SMTP
    z.add(f"_{port}._tcp.mx2", "TLSA", make_tlsa(current.cert).text)
    lab.zone("bogus-inbound.test", corrupt="signature").add("@", "A", "127.0.0.97")
    try:
        lab.start()
    except DnsLabError as exc:
        pytest.fail(f"DNS lab could not start: {exc}", pytrace=False)
    try:
        lab.wait_validating(ZONE, "bogus-inbound.test")
    except DnsLabError as exc:
        pytest.fail(str(exc), pytrace=False)
    config = workdir / "mxgate.toml"
    config.write_text(
        f'[server]\nstate_dir = "{workdir / "var"}"\n'
        f'[dns]\nresolvers = ["{lab.endpoint}"]\ntimeout = 2.0\n'
        f'self_test_secure = "{ZONE}"\nself_test_bogus = "bogus-inbound.test"\n'
        f'[[outbound_connector]]\nname = "internet"\nrecipient_domains = ["*"]\nuse_mx = true\nmx_port = {port}\n'
    )
    try:
        yield CliLab(lab, port, config, current, published_next, unpublished_next, stranger)
    finally:
        lab.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tlsa_prints_the_record_to_publish(cli_lab: CliLab, capsys: pytest.CaptureFixture[str]) -> None:
    cert = cli_lab.current
    code, out, _ = run(capsys, "dane", "tlsa", "--cert", str(cert.chain_path))
    assert code == 0 and out.strip() == make_tlsa(cert.cert).text
    code, out, _ = run(capsys, "dane", "tlsa", "--cert", str(cert.chain_path), "--host", MX, "--matching", "2")
    assert out.strip() == f"_25._tcp.{MX}. IN TLSA {make_tlsa(cert.cert, 3, 1, 2).text}"
    code, out, _ = run(capsys, "dane", "tlsa", "--cert", str(cert.fullchain_path), "--usage", "2", "--selector", "0")
    assert code == 0 and out.strip() == make_tlsa(cert.root, 2, 0, 1).text
    code, _, err = run(capsys, "dane", "tlsa", "--cert", str(cert.cert_path), "--usage", "2")
    assert code == 1 and "needs the chain" in err


def test_check_inbound_matches_and_warns_about_unpublished_next(
    cli_lab: CliLab, capsys: pytest.CaptureFixture[str]
) -> None:
    with ThreadedSmtpSink(MX_IP, cli_lab.port, tls=cli_lab.current, hostname=MX):
        code, out, _ = run(
            capsys,
            "dane",
            "check-inbound",
            MX,
            "--port",
            str(cli_lab.port),
            "--cert",
            str(cli_lab.current.chain_path),
            "--next-cert",
            str(cli_lab.published_next.chain_path),
            "--next-cert",
            str(cli_lab.unpublished_next.chain_path),
            "--json",
            "-c",
            str(cli_lab.config),
        )
    report = json.loads(out)
    assert code == 0 and report["ok"], report["errors"]
    assert report["tlsa_status"] == "secure"
    assert [s["matches"] for s in report["served"]] == [True]
    assert report["served"][0]["matched"] == "3 1 1"
    pending = report["next_certificates_unpublished"]
    assert pending == [
        {"file": str(cli_lab.unpublished_next.chain_path), "record": make_tlsa(cli_lab.unpublished_next.cert).text}
    ]
    assert any("NOT published yet" in w for w in report["warnings"])
    assert any("1 1 1" in w and "not used for SMTP" in w for w in report["warnings"])


def test_check_inbound_fails_when_the_served_certificate_is_not_published(
    cli_lab: CliLab, capsys: pytest.CaptureFixture[str]
) -> None:
    with ThreadedSmtpSink(MX2_IP, cli_lab.port, tls=cli_lab.stranger, hostname=MX2):
        code, out, _ = run(capsys, "dane", "check-inbound", MX2, "--port", str(cli_lab.port), "-c", str(cli_lab.config))
    assert code == 1
    assert "DOES NOT MATCH" in out and "does not match the TLSA records" in out and out.rstrip().endswith("FAILED")


def test_explain_connect_shows_records_chain_and_match(cli_lab: CliLab, capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadedSmtpSink(MX_IP, cli_lab.port, tls=cli_lab.current, hostname=MX):
        code, out, _ = run(capsys, "dane", "explain", ZONE, "--connect", "--json", "-c", str(cli_lab.config))
    ex = json.loads(out)
    assert code == 0, ex
    assert ex["applies"] and ex["mx_secure"] and ex["self_test"]["validating"]
    (host,) = ex["hosts"]
    assert host["host"] == MX and host["state"] == "dane"
    usable = {" ".join(r["record"].split()[:3]): r["usable"] for r in host["records"]}
    assert usable == {"3 1 1": True, "1 1 1": False}
    assert host["policy"]["sni"] == MX and host["policy"]["reference_ids"] == [MX, ZONE]
    (session,) = host["sessions"]
    assert session["verified"] and session["label"] == "verified"
    assert session["matched_record"] == make_tlsa(cli_lab.current.cert).text
    assert session["chain"][0]["3 1 1"] == make_tlsa(cli_lab.current.cert).data.hex()
    code, text, _ = run(capsys, "dane", "explain", ZONE, "-c", str(cli_lab.config))
    assert code == 0 and "TLS level SECURE" in text and "unusable 1 1 1" in text
    # `mxgate explain DOMAIN [--connect]`: the per-host view of the code delivery runs (issue 17)
    code, view, _ = run(capsys, "explain", ZONE, "-c", str(cli_lab.config))
    assert code == 0 and f"{MX}:{cli_lab.port}" in view and "dane (tlsa), TLS level SECURE" in view, view
    with ThreadedSmtpSink(MX_IP, cli_lab.port, tls=cli_lab.current, hostname=MX):
        code, out, _ = run(capsys, "explain", ZONE, "--connect", "--json", "-c", str(cli_lab.config))
    (host,) = json.loads(out)["hosts"]
    assert code == 0 and (host["mechanism"], host["level"], host["sni"]) == ("dane", "SECURE", MX)
    (session,) = host["sessions"]
    assert session["ok"] and (session["verification"], session["matched"]) == ("verified", "3 1 1")
