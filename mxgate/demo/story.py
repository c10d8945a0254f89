"""The demo's world and story (see :mod:`mxgate.demo`): built from mxgate.testing, run against a real gateway.

Everything listens on 127.0.0.0/8 and lives in one temporary directory:

- the DNS lab: ``bank.test`` and ``broken.test`` signed (TLSA records at ``_<port>._tcp.mx``), ``shop.test`` and
  ``plain.test`` unsigned, ``attacker.test`` for the forged MX, ``bogus.test`` (broken signatures) for the
  gateway's DNSSEC self-test;
- one aiosmtpd sink per MX host on its own 127.0.25.x address, all on one port (the connector's ``mx_port``);
- the MTA-STS policy of ``shop.test``, served over HTTPS by the gateway's own ``mta_sts`` agent
  (``serve_policies``) with a test-CA certificate, fetched by the same agent (``fetch_port``, ``ca_file``);
- the gateway (:func:`mxgate.testing.gateway.running_gateway`) with the built-in agents, and a
  :class:`~mxgate.testing.recorder.Recorder` watching TLS outcomes and each recipient's fate.

Every line printed passes :func:`shown`: text that came from the network (replies, trace records) is escaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shutil
import smtplib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from mxgate import DeliveryReport, PolicyType, TlsOutcome, TlsRptResult
from mxgate.core import cli
from mxgate.core.errors import MxgateError
from mxgate.core.logs import LogfmtFormatter
from mxgate.plugins.dane import make_tlsa
from mxgate.testing.ca import IssuedCert, TestCA, self_signed
from mxgate.testing.dnslab import DnsLab, DnsLabError
from mxgate.testing.gateway import free_port, running_gateway
from mxgate.testing.recorder import Recorder
from mxgate.testing.sinks import ReceivedMessage, SmtpSink

GATEWAY = "gw.sender.test"
SENDER = "alice@sender.test"
BANK, BROKEN, SHOP, PLAIN = "bank.test", "broken.test", "shop.test", "plain.test"
BANK_MX, BROKEN_MX, SHOP_MX, PLAIN_MX = (f"mx.{d}" for d in (BANK, BROKEN, SHOP, PLAIN))
FORGED_MX = "mx.attacker.test"
POLICY_HOST = f"mta-sts.{SHOP}"
MX_IPS = {
    BANK_MX: "127.0.25.1",
    BROKEN_MX: "127.0.25.2",
    FORGED_MX: "127.0.25.3",
    SHOP_MX: "127.0.25.4",
    PLAIN_MX: "127.0.25.5",
}
POLICY_IP = "127.0.25.10"
SELF_TEST_BOGUS = "bogus.test"
STS_ID = "20261207demo"
MAX_RTT_MS = 3000  # no dead delegation here: nsd slowed down by a busy machine must not be taken for dead
FATE_TIMEOUT = 12.0  # seconds for a message's first delivery attempt (usually well under one)


class DemoError(MxgateError):
    """The demo could not be set up or run (not an unexpected outcome: those are reported as such)."""


def shown(text: str) -> str:
    """``text`` safe for a terminal: printable ASCII kept, everything else escaped (``\\x1b``, ``\\u202e``)."""
    out = []
    for ch in text:
        if " " <= ch <= "~":
            out.append(ch)
        elif ch == "\t":
            out.append("\\t")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


_stdout_gone: list[bool] = []  # set once the reader went away (`mxgate demo | head`)


def say(text: str = "", *, indent: int = 0) -> None:
    if _stdout_gone:
        return
    try:
        for line in text.splitlines() or [""]:
            print(" " * indent + shown(line), flush=True)
    except BrokenPipeError:  # finish quietly (and still stop and remove everything)
        _stdout_gone.append(True)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -- the world ----------------------------------------------------------------------------------------------------


@dataclass
class World:
    workdir: Path
    lab: DnsLab
    certs: dict[str, IssuedCert]  # MX host (and POLICY_HOST) -> the certificate it serves
    ca: TestCA
    tlsa: dict[str, str]  # MX host -> the TLSA record published for it
    smtp_port: int
    https_port: int


def build_world(workdir: Path) -> World:
    """Certificates, zones and ports; nothing started yet."""
    ca = TestCA.create(workdir / "ca", "mxgate demo CA")
    certs_dir = workdir / "certs"
    certs = {host: ca.issue([host], directory=certs_dir) for host in (BANK_MX, BROKEN_MX, FORGED_MX, SHOP_MX)}
    certs[PLAIN_MX] = self_signed(certs_dir / "self-signed", [PLAIN_MX])
    certs[POLICY_HOST] = ca.issue([POLICY_HOST], directory=certs_dir)
    retired = ca.issue([BROKEN_MX], directory=certs_dir / "retired")  # the key broken.test's TLSA still names
    smtp_port, https_port = free_port(*MX_IPS.values()), free_port(POLICY_IP)
    tcp = f"_{smtp_port}._tcp"
    tlsa = {BANK_MX: make_tlsa(certs[BANK_MX].cert).text, BROKEN_MX: make_tlsa(retired.cert).text}

    lab = DnsLab(workdir / "dns", max_rtt_ms=MAX_RTT_MS)
    for domain in (BANK, BROKEN):
        mx = f"mx.{domain}"
        lab.zone(domain).add("@", "MX", "10 mx").add("mx", "A", MX_IPS[mx]).add(f"{tcp}.mx", "TLSA", tlsa[mx])
    lab.zone("attacker.test", signed=False).add("mx", "A", MX_IPS[FORGED_MX])
    shop = lab.zone(SHOP, signed=False)
    shop.add("@", "MX", f"5 {FORGED_MX}.").add("@", "MX", "10 mx").add("mx", "A", MX_IPS[SHOP_MX])
    shop.add("_mta-sts", "TXT", f'"v=STSv1; id={STS_ID}"').add("mta-sts", "A", POLICY_IP)
    lab.zone(PLAIN, signed=False).add("@", "MX", "10 mx").add("mx", "A", MX_IPS[PLAIN_MX])
    lab.zone(SELF_TEST_BOGUS, corrupt="signature").add("@", "A", "127.0.25.99")
    return World(workdir, lab, certs, ca, tlsa, smtp_port, https_port)


def gateway_toml(world: World) -> str:
    policy = world.certs[POLICY_HOST]
    document: dict[str, Any] = {
        "server": {"hostname": GATEWAY},
        "outbound_connector": [
            {
                "name": "internet",
                "recipient_domains": ["*"],
                "use_mx": True,
                "mx_port": world.smtp_port,
                "tls": "opportunistic",
                "dane": "opportunistic",
                "mta_sts": "opportunistic",
                "connect_timeout": 5.0,
                "command_timeout": 10.0,
            }
        ],
        "dns": {
            "resolvers": [str(world.lab.endpoint)],
            "self_test_secure": BANK,
            "self_test_bogus": SELF_TEST_BOGUS,
        },
        "metrics": {"listen": ""},
        "plugins": {
            "mta_sts": {
                "ca_file": str(world.ca.cert_path),
                "fetch_port": world.https_port,
                "serve_listen": f"{POLICY_IP}:{world.https_port}",
                "serve_cert": str(policy.chain_path),
                "serve_key": str(policy.key_path),
                "serve_policies": [{"domain": SHOP, "mode": "enforce", "mx": [SHOP_MX], "max_age": 86400}],
            },
            "tlsrpt": {"organization_name": "mxgate demo", "contact_info": f"postmaster@{GATEWAY}"},
        },
    }
    return tomli_w.dumps(document)


# -- the play -----------------------------------------------------------------------------------------------------


@dataclass
class Scene:
    number: int
    domain: str
    title: str
    subject: str
    queue_id: str = ""
    fate: DeliveryReport | None = None
    mx_status: str = ""
    outcomes: list[TlsOutcome] = field(default_factory=list)


@dataclass
class Played:
    scenes: list[Scene]
    received: dict[str, tuple[ReceivedMessage, ...]]  # MX host -> what its sink accepted
    connections: dict[str, int]  # MX host -> TCP connections its sink accepted
    config_path: Path
    gateway_port: int


SCENES = (
    (BANK, "DANE-EE: a signed domain whose TLSA record matches its MX", "Quarterly statement"),
    (BROKEN, "DANE: the TLSA record does not match the MX's certificate", "Invoice 4711"),
    (SHOP, "MTA-STS enforce: a forged MX record", "Your order has shipped"),
    (PLAIN, "An unsigned domain: opportunistic TLS", "Lunch on Friday?"),
)


def submit(host: str, port: int, scene: Scene) -> str:
    """Send one message to the gateway over SMTP (as a mail client would); return the queue id it answered."""
    rcpt = f"bob@{scene.domain}"
    data = (
        f"From: Alice <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {scene.subject}\r\n"
        f"Message-ID: <demo-{scene.number}@sender.test>\r\n"
        f"Date: {datetime.now(UTC).strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n\r\n"
        f"Scenario {scene.number} of mxgate demo.\r\n"
    ).encode()
    with smtplib.SMTP(host, port, timeout=15, local_hostname="client.sender.test") as client:
        client.ehlo()
        steps: tuple[Callable[[], tuple[int, bytes]], ...] = (
            lambda: client.mail(SENDER),
            lambda: client.rcpt(rcpt),
            lambda: client.data(data),
        )
        for step in steps:
            code, raw = step()
            reply = f"{code} {raw.decode(errors='replace')}"
            if code // 100 != 2:
                raise DemoError(f"the gateway refused the message to {rcpt}: {reply}")
    found = re.search(r"queued as (\S+)", reply)
    if found is None:
        raise DemoError(f"no queue id in the gateway's reply: {reply}")
    return found.group(1)


async def play(world: World) -> Played:
    recorder = Recorder()
    scenes = [Scene(n, domain, title, subject) for n, (domain, title, subject) in enumerate(SCENES, 1)]
    gateway_dir = world.workdir / "gateway"
    gateway_dir.mkdir()
    async with contextlib.AsyncExitStack() as stack:
        sinks = {
            host: await stack.enter_async_context(SmtpSink(ip, world.smtp_port, tls=world.certs[host], hostname=host))
            for host, ip in MX_IPS.items()
        }
        gw = await stack.enter_async_context(
            running_gateway(gateway_toml(world), gateway_dir, extra_plugins=[("recorder", recorder)])
        )
        # DANE is decided only once the gateway has proven that its resolver validates (the start-up self-test)
        self_test = await recorder.wait_for_event("dns_self_test", 20.0)
        if self_test.label("result") != "validating":
            raise DemoError("the gateway's DNSSEC self-test failed: unbound in the DNS lab does not validate")
        for scene in scenes:  # one after the other, as the story tells them (and a lighter load on the lab)
            scene.queue_id = await asyncio.to_thread(submit, gw.smtp_host, gw.smtp_port, scene)
            try:
                scene.fate = await recorder.wait_for_fate(scene.queue_id, FATE_TIMEOUT)
            except TimeoutError:
                scene.fate = None
        resolver = gw.runtime.resolver
        for scene in scenes:
            if resolver is not None:
                scene.mx_status = str((await resolver.resolve(scene.domain, "MX")).status)
            # a tlsa result's policy domain is the MX host's TLSA base domain (RFC 8460 §4.4), an sts one the domain's
            scene.outcomes = [o for o in recorder.outcomes if o.policy_domain in (scene.domain, f"mx.{scene.domain}")]
        received = {host: sink.messages for host, sink in sinks.items()}
        connections = {host: sink.connections for host, sink in sinks.items()}
        return Played(scenes, received, connections, gw.config_path, gw.smtp_port)


# -- the story ----------------------------------------------------------------------------------------------------


@dataclass
class Verdicts:
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok


def _fate_line(fate: DeliveryReport | None) -> str:
    if fate is None:
        return f"no delivery attempt within {FATE_TIMEOUT:g} s"
    return f"{fate.result}: {fate.reply}"


def _outcome(scene: Scene, host: str) -> TlsOutcome | None:
    return next((o for o in reversed(scene.outcomes) if o.mx_host == host), None)


def _explain(scene: Scene) -> None:
    """What the gateway saw, per TLS session or policy failure (when an outcome was not the expected one)."""
    for o in scene.outcomes:
        result = f"ok ({o.verification})" if o.success else f"failed: {o.result_type}"
        say(f"   TLS outcome: {o.mx_host or '-'} policy {o.policy_type} {result} {o.detail}".rstrip(), indent=3)


def tell_dane_ok(scene: Scene, world: World, played: Played, v: Verdicts) -> None:
    o = _outcome(scene, BANK_MX)
    (msg,) = played.received[BANK_MX] or (None,)
    say(f"{BANK} MX 10 {BANK_MX}   (DNSSEC: {scene.mx_status})", indent=3)
    say(f"_{world.smtp_port}._tcp.{BANK_MX} TLSA {world.tlsa[BANK_MX]}", indent=3)
    say(f"   = SHA-256 of the public key in the certificate {BANK_MX} presents", indent=3)
    ok = v.expect(
        scene.fate is not None and scene.fate.result == "delivered" and msg is not None and msg.tls_version is not None
        and o is not None and o.success and o.policy_type is PolicyType.TLSA and o.verification == "verified",
        f"scenario 1: expected delivery over DANE-EE to {BANK_MX}; {_fate_line(scene.fate)}",
    )  # fmt: skip
    if ok and o is not None and msg is not None:
        how = f"peer authenticated by DANE-EE (TLSA {o.matched})"
        say(f"=> delivered to {BANK_MX} over {msg.tls_version}, {how}", indent=3)
        say(f"   {BANK_MX} answered: {scene.fate.reply if scene.fate else ''}", indent=3)
    else:
        say(f"=> UNEXPECTED: {_fate_line(scene.fate)}", indent=3)
        _explain(scene)


def tell_dane_held(scene: Scene, world: World, played: Played, v: Verdicts) -> None:
    o = _outcome(scene, BROKEN_MX)
    say(f"{BROKEN} MX 10 {BROKEN_MX}   (DNSSEC: {scene.mx_status})", indent=3)
    say(f"_{world.smtp_port}._tcp.{BROKEN_MX} TLSA {world.tlsa[BROKEN_MX]}", indent=3)
    say("   = the key of a retired certificate; the server presents a new one (a key rollover gone wrong)", indent=3)
    ok = v.expect(
        scene.fate is not None and scene.fate.result == "deferred" and not played.received[BROKEN_MX]
        and o is not None and not o.success and o.result_type is TlsRptResult.TLSA_INVALID,
        f"scenario 2: expected the message held (deferred, tlsa-invalid); {_fate_line(scene.fate)}",
    )  # fmt: skip
    if ok and scene.fate is not None:
        say(f"=> held in the queue (deferred, not bounced): {scene.fate.reply}", indent=3)
        say(f"   {BROKEN_MX} received no message; TLS-RPT counts a tlsa-invalid failure; retried later", indent=3)
    else:
        say(f"=> UNEXPECTED: {_fate_line(scene.fate)}", indent=3)
        _explain(scene)


def tell_sts(scene: Scene, world: World, played: Played, v: Verdicts) -> None:
    o = _outcome(scene, SHOP_MX)
    forged = played.connections[FORGED_MX]
    say(f"{SHOP} MX 5 {FORGED_MX}, MX 10 {SHOP_MX}   (DNSSEC: {scene.mx_status})", indent=3)
    say(f"   MX 5 is forged (nothing proves an unsigned answer false): preferred, and {FORGED_MX}", indent=3)
    say("   even has a valid certificate for its own name", indent=3)
    policy = "; ".join(o.policy_strings) if o is not None and o.policy_strings else "(not fetched)"
    say(f"https://{POLICY_HOST}/.well-known/mta-sts.txt: {policy}", indent=3)
    ok = v.expect(
        scene.fate is not None and scene.fate.result == "delivered" and scene.fate.mx_host == SHOP_MX
        and forged == 0 and len(played.received[SHOP_MX]) == 1
        and o is not None and o.success and o.policy_type is PolicyType.STS,
        f"scenario 3: expected {FORGED_MX} skipped and delivery to {SHOP_MX}; {_fate_line(scene.fate)}, "
        f"{forged} connection(s) to {FORGED_MX}",
    )  # fmt: skip
    if ok:
        say(f"=> {FORGED_MX} is not in the policy's mx list: it got nothing (0 connections)", indent=3)
        say(f"=> delivered to {SHOP_MX}, certificate verified against the policy (WebPKI, the demo CA)", indent=3)
    else:
        say(f"=> UNEXPECTED: {_fate_line(scene.fate)}; {forged} connection(s) to {FORGED_MX}", indent=3)
        _explain(scene)


def tell_plain(scene: Scene, world: World, played: Played, v: Verdicts) -> None:
    o = _outcome(scene, PLAIN_MX)
    (msg,) = played.received[PLAIN_MX] or (None,)
    say(f"{PLAIN} MX 10 {PLAIN_MX}   (DNSSEC: {scene.mx_status}); no TLSA, no MTA-STS policy", indent=3)
    say(f"{PLAIN_MX} presents a self-signed certificate", indent=3)
    ok = v.expect(
        scene.fate is not None and scene.fate.result == "delivered" and msg is not None and msg.tls_version is not None
        and o is not None and o.policy_type is PolicyType.NO_POLICY,
        f"scenario 4: expected opportunistic delivery to {PLAIN_MX}; {_fate_line(scene.fate)}",
    )  # fmt: skip
    if ok and msg is not None:
        say(f"=> delivered opportunistically over {msg.tls_version}: encrypted, not authenticated", indent=3)
        say("   (nothing published asks for more; a sender cannot tell a forged MX here)", indent=3)
    else:
        say(f"=> UNEXPECTED: {_fate_line(scene.fate)}", indent=3)
        _explain(scene)


TELLERS: tuple[Callable[[Scene, World, Played, Verdicts], None], ...] = (
    tell_dane_ok,
    tell_dane_held,
    tell_sts,
    tell_plain,
)


def run_command(argv: list[str]) -> tuple[int, str]:
    """An ``mxgate`` command in this process (as the operator would run it); its exit status and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(argv)
    return status, out.getvalue()


def split_reports(text: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``mxgate tlsrpt show`` output -> {policy domain: (file name, report)}."""
    reports: dict[str, tuple[str, dict[str, Any]]] = {}
    for chunk in re.split(r"^# ", text, flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        doc = json.loads(body)
        reports[doc["policies"][0]["policy"]["policy-domain"]] = (name.strip(), doc)
    return reports


def tell_tlsrpt(config: Path, v: Verdicts) -> None:
    day = datetime.now(UTC).date().isoformat()
    status, text = run_command(["tlsrpt", "show", "-c", str(config), "--date", day])
    try:
        reports = split_reports(text) if status == 0 else {}
    except (ValueError, KeyError, IndexError) as exc:
        reports = {}
        text = f"{text}\n(unreadable: {exc})"
    # DANE results are reported to the MX host's TLSA base domain (RFC 8460 §4.4), MTA-STS ones to the domain
    domains = (BANK_MX, BROKEN_MX, SHOP, PLAIN)
    if not v.expect(set(reports) == set(domains), "TLS-RPT: expected one report per policy domain"):
        say(f"=> UNEXPECTED `mxgate tlsrpt show` output (exit {status}):", indent=3)
        say(text, indent=6)
        return
    say(f"{'policy domain':<14} {'policy-type':<16} {'successful':>10} {'failed':>7}  failures", indent=3)
    for domain in domains:
        for p in reports[domain][1]["policies"]:
            summary = p["summary"]
            details = p.get("failure-details", [])
            kinds = ", ".join(f"{d['result-type']} ({d['receiving-mx-hostname']})" for d in details)
            say(
                f"{domain:<14} {p['policy']['policy-type']:<16} {summary['total-successful-session-count']:>10} "
                f"{summary['total-failure-session-count']:>7}  {kinds or '-'}",
                indent=3,
            )
    name, doc = reports[BROKEN_MX]
    say()
    say(f"The report for {BROKEN_MX} (`mxgate tlsrpt show --date {day} --domain {BROKEN_MX}`):", indent=3)
    say(f"# {name}", indent=3)
    say(json.dumps(doc, indent=2), indent=3)


def tell_trace(config: Path, scene: Scene, v: Verdicts) -> None:
    status, text = run_command(["trace", "-c", str(config), scene.queue_id])
    ok = v.expect(status == 0 and scene.queue_id in text, f"trace: no tracking records for {scene.queue_id}")
    if not ok:
        say(f"=> UNEXPECTED `mxgate trace` output (exit {status}):", indent=3)
    say(text.rstrip(), indent=3)


@contextlib.contextmanager
def gateway_log(path: Path) -> Iterator[None]:
    """The gateway's log goes to a file, not between the story's lines."""
    root, smtp_sinks = logging.getLogger(), logging.getLogger("mail.log")  # aiosmtpd: a line per command
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(LogfmtFormatter())
    levels = root.level, smtp_sinks.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    smtp_sinks.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        smtp_sinks.setLevel(levels[1])
        handler.close()


def log_warnings(path: Path, limit: int = 15) -> list[str]:
    """The gateway's last warnings and errors (what an operator reads first when an outcome surprises)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "level=warning" in line or "level=error" in line][-limit:]


def tell(world: World, played: Played) -> Verdicts:
    v = Verdicts()
    for scene, teller in zip(played.scenes, TELLERS, strict=True):
        say()
        say(f"{scene.number}. {scene.title}")
        say(f'   alice@sender.test -> bob@{scene.domain}  "{scene.subject}"  (queue id {scene.queue_id})')
        teller(scene, world, played, v)
    say()
    say("TLS-RPT (RFC 8460): what the gateway will report tomorrow for today, per policy domain")
    tell_tlsrpt(played.config_path, v)
    held = played.scenes[1]
    say()
    say(f"The held message's story (`mxgate trace {held.queue_id}`):")
    tell_trace(played.config_path, held, v)
    return v


def main(*, keep: bool = False) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mxgate-demo-"))
    verdicts: Verdicts | None = None
    error: str | None = None
    try:
        say("mxgate demo: four messages through a real gateway; everything on 127.0.0.0/8, nothing leaves this host")
        world = build_world(workdir)
        with gateway_log(workdir / "gateway.log"):
            world.lab.start()
            try:
                world.lab.wait_validating(BANK, SELF_TEST_BOGUS)
                say(
                    f"   DNS lab: nsd serving signed and unsigned zones under test., unbound validating "
                    f"({world.lab.endpoint}); SMTP sinks on 127.0.25.1-5:{world.smtp_port}; "
                    f"MTA-STS policy on https://{POLICY_IP}:{world.https_port}"
                )
                played = asyncio.run(play(world))
            finally:
                world.lab.stop()
            say(f"   gateway {GATEWAY} on 127.0.0.1:{played.gateway_port}: SMTP in, MX delivery out "
                "(DANE and MTA-STS opportunistic, TLS-RPT on)")  # fmt: skip
            verdicts = tell(world, played)
    except (DemoError, DnsLabError, TimeoutError, OSError) as exc:
        error = str(exc)
    finally:
        try:
            if error is not None or verdicts is None or verdicts.problems:
                warned = log_warnings(workdir / "gateway.log")
                if warned:
                    say()
                    say("The gateway's last warnings and errors:")
                    for line in warned:
                        say(line, indent=3)
            if keep:
                say(f"\nkept: {workdir} (mxgate.toml and state under gateway/, gateway.log, zones under dns/)")
        finally:
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    problem = error if error is not None else verdicts.problems[0] if verdicts and verdicts.problems else None
    if problem is not None:
        first, _, detail = problem.partition("\n")
        if detail:  # e.g. a daemon's log tail: on standard output, the one line on standard error
            say(detail, indent=3)
        print(f"mxgate demo: FAILED: {shown(first)}", file=sys.stderr)
        return 1
    say()
    say(f"All four outcomes as expected ({took:.1f} s). Stopped the gateway, the SMTP sinks, nsd and unbound.")
    return 0
