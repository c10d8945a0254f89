"""MTA-STS against real servers on loopback: the DNS lab (nsd + unbound) publishes ``_mta-sts`` TXT and
``mta-sts`` A records; a real HTTPS server with certificates from a test CA serves policies (good, bad, redirects,
untrusted, wrong names); the plugin runs in a real Runtime with its SQLite cache (RFC-CHECKLIST 18-24)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mxgate.core import cli, engine
from mxgate.core.dns import Resolver
from mxgate.core.hookspecs import hookimpl
from mxgate.core.outcomes import (
    Destination,
    HopHost,
    NextHop,
    PolicyType,
    ReportEvent,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.runtime import Runtime
from mxgate.core.tls import server_context
from mxgate.plugins.mta_sts import CACHE_FILE, FetchStatus, MtaStsPlugin, SqlitePolicyStore
from mxgate.plugins.mta_sts.policy import parse_policy, render_policy
from mxgate.testing.ca import TestCA
from mxgate.testing.dnslab import DnsLab

pytestmark = pytest.mark.integration

HTTPS_IP = "127.0.0.81"  # the scripted policy server
DEAD_IP = "127.0.0.82"  # nothing listens here
SERVE_IP = "127.0.0.83"  # the plugin's own policy listener

ENFORCE = render_policy("enforce", ["mx1.enforce.test", "*.b.enforce.test"], 86400)
GOOD = {
    "enforce": ENFORCE,
    "testing": render_policy("testing", ["mx1.testing.test"], 86400),
    "none": render_policy("none", [], 86400),
    "split": render_policy("enforce", ["mx.split.test"], 86400),
    "flaky": render_policy("enforce", ["mx.flaky.test"], 86400),
    "down": ENFORCE,
}
BAD_TXT = {
    "ver12": ['"v=STSv12; id=x1"'],
    "order": ['"id=x1; v=STSv1"'],
    "two": ['"v=STSv1; id=one"', '"v=STSv1; id=two"'],
    "longid": ['"v=STSv1; id=abcdefghijklmnopqrstuvwxyz0123456"'],
}


def _response(status: int, body: bytes, content_type: str = "text/plain", **headers: str) -> tuple[Any, ...]:
    return status, body, {"Content-Type": content_type, **headers}


RESPONSES: dict[str, tuple[Any, ...]] = {
    **{f"mta-sts.{d}.test": _response(200, text.encode()) for d, text in GOOD.items()},
    **{f"mta-sts.{d}.test": _response(200, ENFORCE.encode()) for d in BAD_TXT},
    "mta-sts.nomx.test": _response(200, b"version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\n"),
    "mta-sts.maxage.test": _response(
        200, b"version: STSv1\r\nmode: enforce\r\nmx: mx.maxage.test\r\nmax_age: 31557601\r\n"
    ),
    "mta-sts.version.test": _response(
        200, b"version: STSv2\r\nmode: enforce\r\nmx: mx.version.test\r\nmax_age: 86400\r\n"
    ),
    "mta-sts.html.test": _response(200, ENFORCE.encode(), "text/html"),
    "mta-sts.big.test": _response(200, ENFORCE.encode() + b"x-padding: " + b"a" * 70000 + b"\r\n"),
    "mta-sts.redirect.test": _response(301, b"", Location="https://mta-sts.enforce.test/.well-known/mta-sts.txt"),
    "mta-sts.missing.test": _response(404, b"not found"),
    "mta-sts.stream.test": _response(200, ENFORCE.encode() + b"x-padding: " + b"a" * 70000 + b"\r\n"),
    "mta-sts.slow.test": _response(200, ENFORCE.encode()),
    "mta-sts.untrusted.test": _response(200, ENFORCE.encode()),
    "mta-sts.wrongname.test": _response(200, ENFORCE.encode()),
}
FETCHED = [*GOOD, *BAD_TXT, "nomx", "maxage", "version", "html", "big", "stream", "slow", "redirect", "missing",
           "untrusted", "wrongname", "noaddr"]  # fmt: skip


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Handler(BaseHTTPRequestHandler):
    server: _PolicyHttps

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        self.server.requests.append((host, self.path))
        status, body, headers = self.server.responses.get(host, _response(404, b"unknown host"))
        if self.server.broken.get(host):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if host == "mta-sts.slow.test":
            self.server.release.wait(5.0)  # bounded: the test releases it
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if host != "mta-sts.stream.test":  # stream: no length, the body ends when the connection does
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return


class _PolicyHttps(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext) -> None:
        super().__init__(address, _Handler)
        self.ctx = ctx
        self.responses = dict(RESPONSES)
        self.broken: dict[str, bool] = {}
        self.requests: list[tuple[str, str]] = []
        self.release = threading.Event()

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate: that is the point of some tests
        with tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        return


@dataclass
class Lab:
    dns: DnsLab
    ca: TestCA
    https: _PolicyHttps
    port: int
    tmp: Path
    serve_cert: tuple[str, str] = ("", "")

    def hosts(self, domain: str) -> int:
        return sum(1 for host, _ in self.https.requests if host == f"mta-sts.{domain}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("sts")
    ca = TestCA.create(tmp / "ca")
    stranger = TestCA.create(tmp / "stranger", "not trusted")
    names = [f"mta-sts.{d}.test" for d in FETCHED if d not in ("untrusted", "wrongname")]
    good = ca.issue(names)
    wrong = ca.issue(["www.elsewhere.test"])
    untrusted = stranger.issue(["mta-sts.untrusted.test"])
    served = ca.issue(["mta-sts.served.test"])
    sni = {name: good.files for name in names}
    sni["mta-sts.untrusted.test"] = untrusted.files
    ctx = server_context(*wrong.files, sni=sni)  # unknown names (wrongname) get the wrong certificate
    port = _free_port(HTTPS_IP)
    https = _PolicyHttps((HTTPS_IP, port), ctx)
    thread = threading.Thread(target=https.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    dns = DnsLab(tmp / "dns")
    for domain in FETCHED:
        z = dns.zone(f"{domain}.test", signed=False)
        for txt in BAD_TXT.get(domain, ['"v=STSv1; id=' + domain + '1"']):
            z.add("_mta-sts", "TXT", txt)
        if domain == "down":
            z.add("mta-sts", "A", DEAD_IP)
        elif domain != "noaddr":
            z.add("mta-sts", "A", HTTPS_IP)
    split = dns.get("split.test")
    split.remove("_mta-sts", "TXT")
    split.add("_mta-sts", "TXT", '"v=STSv1; " "id=split1"')  # two strings, concatenated
    dns.zone("served.test", signed=False).add("mta-sts", "A", SERVE_IP)
    dns.zone("nosts.test", signed=False).add("@", "MX", "10 mx")
    dns.start()
    try:
        yield Lab(dns, ca, https, port, tmp, serve_cert=served.files)
    finally:
        https.shutdown()
        https.server_close()
        dns.stop()


# -- a real Runtime with the plugin -------------------------------------------------------------------------


@dataclass
class Capture:
    events: list[ReportEvent] = field(default_factory=list)
    outcomes: list[TlsOutcome] = field(default_factory=list)
    name: str = "capture"

    @hookimpl
    def mxgate_report_on_event(self, event: ReportEvent) -> None:
        self.events.append(event)

    @hookimpl
    def mxgate_delivery_on_tls_outcome(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)

    def results(self, kind: str, label: str) -> list[str]:
        return [e.label(label) for e in self.events if e.kind == kind]


def write_config(lab: Lab, state: Path, *, mode: str = "opportunistic", extra: dict[str, Any] | None = None) -> Path:
    document: dict[str, Any] = {
        "server": {"hostname": "mx.gateway.test", "state_dir": str(state)},
        "listener": [{"name": "smtp", "address": f"127.0.0.1:{_free_port('127.0.0.1')}"}],
        "outbound_connector": [{"name": "internet", "recipient_domains": ["*"], "use_mx": True, "mta_sts": mode}],
        "dns": {"resolvers": [str(lab.dns.endpoint)], "timeout": 2.0},
        "plugins": {
            "disable": ["dnssec", "dane", "tlsrpt", "prometheus"],
            "mta_sts": {
                "ca_file": str(lab.ca.cert_path),
                "fetch_port": lab.port,
                "fetch_timeout": 3.0,
                **(extra or {}),
            },
        },
    }
    path = state.parent / f"{state.name}.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def running(lab: Lab, state: Path, **kwargs: Any) -> AsyncIterator[tuple[Runtime, MtaStsPlugin, Capture]]:
    capture = Capture()
    config, plugins = engine.load(
        write_config(lab, state, **kwargs), entry_points=False, extra_plugins=[("capture", capture)]
    )
    runtime = Runtime.create(config, plugins)
    runtime.resolver = Resolver([lab.dns.endpoint], timeout=2.0)
    await runtime.hooks.on_startup(runtime)
    plugin = plugins.pm.get_plugin("mta_sts")
    assert isinstance(plugin, MtaStsPlugin)
    try:
        yield runtime, plugin, capture
    finally:
        for task in runtime.tasks:
            task.cancel()
        await runtime.hooks.on_shutdown(runtime)


def next_hop(runtime: Runtime, domain: str, *hosts: str) -> NextHop:
    connector = runtime.config.outbound("internet")
    assert connector is not None
    dest = Destination(connector, domain)
    return NextHop(dest, tuple(HopHost(h, 25, 10 * i) for i, h in enumerate(hosts, 1)), "mx")


async def sts_policy(runtime: Runtime, domain: str, *hosts: str) -> TlsPolicy | None:
    hop = next_hop(runtime, domain, *(hosts or (f"mx1.{domain}",)))
    policies = await runtime.hooks.resolve_tls_policy(hop.destination, hop)
    return next((p for p in policies if p.source == "mta_sts"), None)


# -- good policies ------------------------------------------------------------------------------------------


async def test_good_policies_in_each_mode(lab: Lab, tmp_path: Path) -> None:
    async with running(lab, tmp_path / "var") as (runtime, _plugin, capture):
        enforce = await sts_policy(runtime, "enforce.test", "mx1.enforce.test", "evil.enforce.test", "x.b.enforce.test")
        assert enforce is not None and enforce.applies and not enforce.report_only
        assert (enforce.level, enforce.policy_type, enforce.precedence) == (TlsLevel.SECURE, PolicyType.STS, 200)
        assert enforce.mx_patterns == ("mx1.enforce.test", "*.b.enforce.test")
        assert enforce.policy_strings == tuple(ENFORCE.split("\r\n")[:-1])
        assert enforce.for_host("mx1.enforce.test").usable and enforce.for_host("x.b.enforce.test").usable
        skipped = enforce.for_host("evil.enforce.test")  # MX not matching a pattern: never dialled
        assert not skipped.usable and skipped.failure is TlsRptResult.VALIDATION_FAILURE

        testing = await sts_policy(runtime, "testing.test", "mx1.testing.test", "other.testing.test")
        assert testing is not None and testing.applies and testing.report_only
        assert testing.for_host("other.testing.test").usable

        none = await sts_policy(runtime, "none.test")
        assert none is not None and not none.applies and none.policy_type is PolicyType.NO_POLICY

        split = await sts_policy(runtime, "split.test", "mx.split.test")  # TXT strings concatenated
        assert split is not None and split.applies and split.mx_patterns == ("mx.split.test",)

        absent = await sts_policy(runtime, "nosts.test")
        assert absent is not None and not absent.applies
        assert capture.results("sts_fetch", "result") == ["ok"] * 4
        assert sorted(capture.results("sts_policy", "mode")) == ["absent", "enforce", "enforce", "none", "testing"]
        for event in capture.events:  # bounded labels: never a domain
            assert not any(".test" in value for _, value in event.labels)
    # the cache is on disk
    store = SqlitePolicyStore(tmp_path / "var" / CACHE_FILE)
    try:
        assert sorted(e.domain for e in store.load_all()) == ["enforce.test", "none.test", "split.test", "testing.test"]
    finally:
        store.close()


async def test_connector_setting_none_means_no_opinion(lab: Lab, tmp_path: Path) -> None:
    requests = lab.hosts("enforce.test")
    async with running(lab, tmp_path / "var", mode="none") as (runtime, _plugin, _capture):
        assert await sts_policy(runtime, "enforce.test") is None
    assert lab.hosts("enforce.test") == requests


# -- bad TXT records ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", sorted(BAD_TXT))
async def test_bad_txt_record_means_no_policy(lab: Lab, tmp_path: Path, domain: str) -> None:
    async with running(lab, tmp_path / "var") as (runtime, _plugin, capture):
        policy = await sts_policy(runtime, f"{domain}.test")
        assert policy is not None and not policy.applies and policy.failure is None
        assert capture.results("sts_fetch", "result") == []
    assert lab.hosts(f"{domain}.test") == 0  # no fetch was even tried


# -- bad policies and fetch failures ---------------------------------------------------------------------------

BAD_FETCHES = [
    ("nomx", FetchStatus.INVALID, TlsRptResult.STS_POLICY_INVALID, "mx"),
    ("maxage", FetchStatus.INVALID, TlsRptResult.STS_POLICY_INVALID, "max_age"),
    ("version", FetchStatus.INVALID, TlsRptResult.STS_POLICY_INVALID, "version"),
    ("html", FetchStatus.INVALID, TlsRptResult.STS_POLICY_INVALID, "text/html"),
    ("big", FetchStatus.INVALID, TlsRptResult.STS_POLICY_INVALID, "65536"),
    ("stream", FetchStatus.INVALID, TlsRptResult.STS_POLICY_INVALID, "larger than 65536"),
    ("redirect", FetchStatus.FETCH_ERROR, TlsRptResult.STS_POLICY_FETCH_ERROR, "redirect"),
    ("missing", FetchStatus.FETCH_ERROR, TlsRptResult.STS_POLICY_FETCH_ERROR, "HTTP 404"),
    ("untrusted", FetchStatus.WEBPKI_INVALID, TlsRptResult.STS_WEBPKI_INVALID, "certificate"),
    ("wrongname", FetchStatus.WEBPKI_INVALID, TlsRptResult.STS_WEBPKI_INVALID, "certificate"),
    ("down", FetchStatus.FETCH_ERROR, TlsRptResult.STS_POLICY_FETCH_ERROR, DEAD_IP),
    ("noaddr", FetchStatus.FETCH_ERROR, TlsRptResult.STS_POLICY_FETCH_ERROR, "resolve"),
]


@pytest.mark.parametrize(("domain", "status", "result_type", "reason"), BAD_FETCHES, ids=[b[0] for b in BAD_FETCHES])
@pytest.mark.parametrize("mode", ["opportunistic", "mandatory"])
async def test_bad_policy(
    lab: Lab, tmp_path: Path, domain: str, status: FetchStatus, result_type: TlsRptResult, reason: str, mode: str
) -> None:
    enforce_requests = lab.hosts("enforce.test")
    async with running(lab, tmp_path / "var", mode=mode) as (runtime, plugin, capture):
        policy = await sts_policy(runtime, f"{domain}.test")
        assert policy is not None
        if mode == "opportunistic":  # deliver as if there were no policy
            assert not policy.applies and policy.failure is None
        else:  # mandatory: no valid policy, no delivery (the core defers)
            assert policy.applies and policy.failure is result_type
        assert capture.results("sts_fetch", "result") == [str(status)]
        if mode == "opportunistic":  # the plugin reports the failed fetch for TLS-RPT (once per fetch)
            (outcome,) = capture.outcomes
            assert (outcome.policy_type, outcome.policy_domain, outcome.success, outcome.result_type) == (
                PolicyType.STS,
                f"{domain}.test",
                False,
                result_type,
            )
            assert reason in outcome.detail
            assert outcome.connector == "internet"
        else:  # the policy carries the failure: the delivery core reports it with each deferral
            assert capture.outcomes == []
            assert reason in policy.detail
        # the same id is not fetched again within five minutes
        await sts_policy(runtime, f"{domain}.test")
        assert capture.results("sts_fetch", "result") == [str(status)]
        assert plugin.engine is not None and plugin.engine.cache.get(f"{domain}.test") is None
    assert lab.hosts("enforce.test") == enforce_requests  # the redirect was never followed


# -- the cache: restarts, server down, id changes -------------------------------------------------------------------


async def test_cached_policy_applies_while_policy_server_is_down(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "var"
    async with running(lab, state) as (runtime, _plugin, _capture):
        first = await sts_policy(runtime, "flaky.test", "mx.flaky.test", "rogue.flaky.test")
        assert first is not None and first.applies
    lab.https.broken["mta-sts.flaky.test"] = True
    try:
        async with running(lab, state) as (runtime, plugin, capture):  # a restart: the cache is read back
            assert plugin.engine is not None
            result = await plugin.engine.refresh("flaky.test")  # a proactive refresh that fails
            assert result.status is FetchStatus.FETCH_ERROR and "HTTP 503" in result.detail
            policy = await sts_policy(runtime, "flaky.test", "mx.flaky.test", "rogue.flaky.test")
            assert policy is not None and policy.applies and not policy.report_only
            assert policy.mx_patterns == ("mx.flaky.test",)
            assert not policy.for_host("rogue.flaky.test").usable
            assert capture.results("sts_refresh", "result") == ["failed"]
            assert capture.results("sts_policy", "origin") == ["cache"]
            entry = plugin.engine.cache.get("flaky.test")
            assert entry is not None and entry.failures == 1
    finally:
        lab.https.broken.pop("mta-sts.flaky.test")


async def test_changed_id_with_failing_fetch_keeps_old_policy(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "var"
    zone = lab.dns.get("flaky.test")
    async with running(lab, state) as (runtime, _plugin, _capture):
        assert (await sts_policy(runtime, "flaky.test", "mx.flaky.test")) is not None
    zone.remove("_mta-sts", "TXT")
    zone.add("_mta-sts", "TXT", '"v=STSv1; id=flaky2"')
    lab.https.responses["mta-sts.flaky.test"] = _response(200, b"version: STSv9\r\n")  # the new policy is broken
    lab.dns.reload()
    try:
        async with running(lab, state) as (runtime, plugin, capture):
            policy = await sts_policy(runtime, "flaky.test", "mx.flaky.test", "rogue.flaky.test")
            assert policy is not None and policy.applies and policy.mx_patterns == ("mx.flaky.test",)
            assert capture.results("sts_fetch", "result") == ["invalid"]
            assert [o.result_type for o in capture.outcomes] == [TlsRptResult.STS_POLICY_INVALID]
            assert plugin.engine is not None
            entry = plugin.engine.cache.get("flaky.test")
            assert entry is not None and entry.policy_id == "flaky1"
            # the server is fixed: the new id is fetched (after the five-minute pause for the failed id)
            fixed = render_policy("testing", ["*.flaky.test"], 600).encode()
            lab.https.responses["mta-sts.flaky.test"] = _response(200, fixed)
            plugin.engine.clock = lambda: runtime.clock() + 301
            policy = await sts_policy(runtime, "flaky.test", "mx.flaky.test")
            assert policy is not None and policy.report_only and policy.mx_patterns == ("*.flaky.test",)
            entry = plugin.engine.cache.get("flaky.test")
            assert entry is not None and entry.policy_id == "flaky2" and entry.policy.max_age == 600
    finally:
        lab.https.responses["mta-sts.flaky.test"] = RESPONSES["mta-sts.flaky.test"]
        zone.remove("_mta-sts", "TXT")
        zone.add("_mta-sts", "TXT", '"v=STSv1; id=flaky1"')
        lab.dns.reload()


# -- serving our own policies, and the commands ------------------------------------------------------------------


async def test_serve_our_policies_and_fetch_them_back(lab: Lab, tmp_path: Path) -> None:
    served = {
        "serve_listen": f"{SERVE_IP}:{lab.port}",
        "serve_cert": lab.serve_cert[0],
        "serve_key": lab.serve_cert[1],
        "serve_policies": [{"domain": "served.test", "mode": "enforce", "mx": ["mx.served.test"], "max_age": 3600}],
    }
    config_path = write_config(lab, tmp_path / "var", extra=served)
    assert cli.main(["sts", "record", "served.test", "-c", str(config_path)]) == 0
    zone = lab.dns.get("served.test")
    async with running(lab, tmp_path / "var", extra=served) as (runtime, plugin, capture):
        assert plugin.server is not None
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["sts", "record", "served.test", "-c", str(config_path)]) == 0
        record = out.getvalue().strip()
        assert record.startswith('_mta-sts.served.test. IN TXT "v=STSv1; id=')
        zone.add("_mta-sts", "TXT", record.split(" IN TXT ", 1)[1])
        lab.dns.reload()
        runtime.resolver = Resolver([lab.dns.endpoint], timeout=2.0)
        policy = await sts_policy(runtime, "served.test", "mx.served.test", "other.served.test")
        assert policy is not None and policy.applies and policy.mx_patterns == ("mx.served.test",)
        assert not policy.for_host("other.served.test").usable
        for _ in range(100):  # the server reports after closing the connection: wait for it (bounded)
            if capture.results("sts_policy_served", "result"):
                break
            await asyncio.sleep(0.02)
        assert capture.results("sts_policy_served", "result") == ["ok"]
        assert capture.results("sts_fetch", "result") == ["ok"]
    zone.remove("_mta-sts", "TXT")
    lab.dns.reload()


def test_commands_refresh_show_list(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(lab, tmp_path / "var"))
    assert cli.main(["sts", "show", "enforce.test", "-c", config]) == 1
    assert "no cached MTA-STS policy" in capsys.readouterr().err
    assert cli.main(["sts", "refresh", "enforce.test", "-c", config]) == 0
    out = capsys.readouterr().out
    assert "mode:         enforce" in out and "id:           enforce1" in out
    assert cli.main(["sts", "refresh", "missing.test", "-c", config]) == 1
    assert "fetch_error" in capsys.readouterr().err
    assert cli.main(["sts", "refresh", "nosts.test", "-c", config]) == 1
    assert "no MTA-STS record" in capsys.readouterr().err
    assert cli.main(["sts", "show", "enforce.test", "--json", "-c", config]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["mx"] == ["mx1.enforce.test", "*.b.enforce.test"] and shown["id"] == "enforce1"
    assert parse_policy(shown["policy"]).max_age == 86400
    assert cli.main(["sts", "list", "-c", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DOMAIN", "ID", "MODE", "EXPIRES", "FAILURES"]
    assert lines[1].split()[:3] == ["enforce.test", "enforce1", "enforce"]
    assert cli.main(["sts", "record", "enforce.test", "-c", config]) == 1  # not one of ours


async def test_slow_policy_server_times_out(lab: Lab, tmp_path: Path) -> None:
    lab.https.release.clear()
    try:
        async with running(lab, tmp_path / "var", extra={"fetch_timeout": 0.5}) as (runtime, _plugin, capture):
            started = runtime.clock()
            policy = await sts_policy(runtime, "slow.test")
            assert runtime.clock() - started < 3.0
            assert policy is not None and not policy.applies
            assert capture.results("sts_fetch", "result") == ["fetch_error"]
            (outcome,) = capture.outcomes
            assert outcome.result_type is TlsRptResult.STS_POLICY_FETCH_ERROR and "0.5s" in outcome.detail
    finally:
        lab.https.release.set()
