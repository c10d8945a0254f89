"""THE contract between mxgate's core and its plugins (Exchange's transport agents).

Every hook is declared here, grouped by stage in the order a message meets them. Names are
``mxgate_<stage>_<event>``: ``on_*`` is a notification or veto point, ``resolve_*`` is "first result wins",
``register_*`` contributes to a registry.

Implementations may be plain functions or ``async def``; the core's dispatcher (:mod:`mxgate.core.plugins`)
awaits them in pluggy's call order. Wrappers (``hookwrapper``/``wrapper``) are refused on async hooks.
An implementation declares only the arguments it uses. A hook that raises is logged with the plugin's name and
counted (``report_on_plugin_error``); on ``on_startup`` start-up fails; on receive verdict hooks the client gets
``451 4.3.0`` and the session continues; on every other hook (categorizer, delivery, notifications) the
implementation is skipped as if it had returned None and the call goes on with the next one (docs/hooks.md,
"When a hook raises").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

from mxgate.core.messages import QueuedMessage
from mxgate.core.metadata import MessageHeaders
from mxgate.core.migrations import MigrationRegistry
from mxgate.core.model import Address, AuthResult, Envelope, IncomingMessage, Session, Verdict
from mxgate.core.outcomes import (
    AttemptContext,
    DeliveryReport,
    Destination,
    NextHop,
    PeerVerification,
    ReportEvent,
    Route,
    TlsOutcome,
    TlsPolicy,
)
from mxgate.core.settings import ConfigRegistry

if TYPE_CHECKING:
    from cryptography import x509

    from mxgate.core.runtime import Runtime

PROJECT = "mxgate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ============================================================================================================
# lifecycle
# ============================================================================================================


@hookspec
def mxgate_lifecycle_register_config(registry: ConfigRegistry) -> None:
    """Called once, before the configuration file is read, to extend the schema.

    Declare a ``[plugins.<name>]`` section with ``registry.add_section(name, FrozenDataclass)`` and connector keys
    with ``registry.add_connector_setting(ConnectorSetting(...))``. The core validates them like its own keys.
    A check across keys or sections (a value naming an outbound connector) is ``add_section(name, cls,
    validate=check)``: ``check(section, config)`` yields problems, reported by ``mxgate config check`` and at
    start-up like the core's own.

    :param registry: the schema being assembled.
    :returns: nothing.
    """


@hookspec
def mxgate_lifecycle_register_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Called when the command line is built: add ``mxgate <command>`` subcommands.

    Set ``parser.set_defaults(func=callable)``; the callable gets the parsed ``args`` and returns an exit code.
    ``mxgate.add_config_arg(parser)`` adds ``-c/--config``; ``mxgate.load_from_args(args)``
    returns ``(config, plugins)`` for the file the operator named.

    :param subparsers: ``argparse`` subparsers of the ``mxgate`` command.
    """


@hookspec
def mxgate_lifecycle_register_migrations(migrations: MigrationRegistry) -> None:
    """Called when cluster mode is configured (``[cluster] database``), at start-up and by ``mxgate cluster
    migrate``, to declare the plugin's tables in the shared PostgreSQL database.

    Add numbered steps with ``migrations.add(component, version, description, sql)``; versions of a component
    start at 1 and only grow (a released step is never edited: add the next one). ``mxgate cluster migrate``
    applies the missing steps in order, each once; a node refuses to start against a database whose schema is
    older than its steps.

    :param migrations: the registry of schema steps, per component.
    :returns: nothing.
    """


@hookspec
def mxgate_lifecycle_on_startup(runtime: Runtime) -> None:
    """Called once the configuration is frozen, before listeners accept connections. Start background tasks here.

    With ``server.receive_workers`` it runs in every process: ``runtime.role`` is ``"main"`` (receives, delivers,
    reports) or ``"receiver"`` (a receive worker: receive hooks only, ``runtime.queue`` is None); start background
    services only in the main process. ``"command"``: a command such as ``mxgate connector validate`` delivers
    once, possibly next to a running gateway: prepare what delivery needs, start no listener or service.

    :param runtime: the running gateway: config, role, resolver, clock, queue, state directory, ``submit()``.
    """


@hookspec
def mxgate_lifecycle_on_shutdown(runtime: Runtime) -> None:
    """Called after listeners stopped and in-flight work drained (or timed out). Stop background tasks here."""


@hookspec
def mxgate_lifecycle_on_preflight(runtime: Runtime, running: bool) -> Sequence[str] | None:
    """Called by ``mxgate check`` (preflight), never by a running gateway: check what this plugin needs to work
    in production — records in DNS, files, the resolver — without starting anything.

    ``runtime`` has the configuration, the resolver and the hooks; no queue, no listener, no background task.

    :param running: a gateway already runs on this state directory (its ports are in use by it, not by a
        stranger).
    :returns: problems, one line each (say what is wrong and where: the file, the record, the port), or ``None``.
    """


# ============================================================================================================
# receive (Exchange's SmtpReceiveAgent). Each veto hook stops at the first non-None Verdict.
# The core's own policy (connectors, relay rules, smuggling, limits) runs before these hooks and cannot be
# overridden: an Accept only skips later plugins.
# ============================================================================================================


@hookspec(firstresult=True)
def mxgate_receive_on_connect(session: Session) -> Verdict | None:
    """Called when a client connects, after the inbound connector was chosen by IP and before the banner.

    Stops at the first non-None result.

    :param session: the connection; plugin state goes in ``session.stash``.
    :returns: ``None`` to abstain, or a Verdict (Reject/Disconnect answer the banner with it).
    """


@hookspec(firstresult=True)
def mxgate_receive_on_ehlo_command(session: Session, hostname: str) -> Verdict | None:
    """Called for EHLO and HELO after syntax checks, before the reply.

    Stops at the first non-None result.

    :param hostname: the name the client gave.
    :returns: ``None`` to abstain, or a Verdict.
    """


@hookspec
def mxgate_receive_on_starttls(session: Session) -> None:
    """Called after a STARTTLS handshake completed and the inbound connector was re-evaluated.

    ``session.tls`` holds the negotiated version, cipher and client certificate names. Notification only.
    """


@hookspec(firstresult=True)
def mxgate_receive_on_auth_command(session: Session, mechanism: str, username: str | None) -> Verdict | None:
    """Called when AUTH starts (username known for PLAIN; None for LOGIN until it is sent). Veto only.

    Stops at the first non-None result.

    :returns: ``None`` to abstain, or a Verdict.
    """


@hookspec(firstresult=True)
def mxgate_receive_resolve_credentials(session: Session, username: str, password: str) -> AuthResult | None:
    """Check a username and password (AUTH PLAIN/LOGIN). The built-in source, a users file with scrypt hashes,
    is a ``trylast`` implementation any plugin can replace.

    Stops at the first non-None result.

    :returns: an AuthResult (ok or not, and why), or ``None`` if this source does not know the user.
    """


@hookspec(firstresult=True)
def mxgate_receive_on_mail_command(session: Session, envelope: Envelope, sender: Address) -> Verdict | None:
    """Called for MAIL FROM after syntax and connector checks, before the sender is accepted.

    Stops at the first non-None result.

    :param envelope: the transaction before this command (``mail_from`` not yet set).
    :param sender: the reverse-path; ``sender.is_null`` for ``<>``.
    :returns: ``None`` to abstain, or a Verdict.
    """


@hookspec(firstresult=True)
def mxgate_receive_on_rcpt_command(session: Session, envelope: Envelope, rcpt: Address) -> Verdict | None:
    """Called for each RCPT TO after syntax and relay checks, before the recipient is accepted.

    Stops at the first non-None result.

    :param session: the connection; plugin state goes in ``session.stash``.
    :param envelope: the current transaction (reset by RSET and after DATA).
    :returns: ``None`` to abstain, or a :class:`Verdict`.
    """


@hookspec(firstresult=True)
def mxgate_receive_on_end_of_headers(session: Session, envelope: Envelope, message: IncomingMessage) -> Verdict | None:
    """Called once the header block has been read (``message.data`` holds the headers only).

    Stops at the first non-None result.

    :param message: headers so far; ``message.add_header()`` prepends a header to the queued message,
        ``message.set_meta(key, value)`` keeps plugin metadata with it (``message.meta.extra`` in categorizer and
        delivery hooks).
    :returns: ``None`` to abstain, or a Verdict (the body is then read and discarded).
    """


@hookspec(firstresult=True)
def mxgate_receive_on_end_of_data(session: Session, envelope: Envelope, message: IncomingMessage) -> Verdict | None:
    """Called after the final ``CRLF.CRLF``, before the message is queued.

    Stops at the first non-None result. If nobody rejects, the message is written to the queue and fsync'ed,
    and only then answered ``250 2.0.0 Ok: queued as <id>``.

    :param message: the whole message; ``message.add_header()`` prepends a header, ``message.set_meta(key,
        value)`` keeps plugin metadata with the queued message (``message.meta.extra[key]`` for categorizer and
        delivery hooks; keys 1-64 of ``A-Z a-z 0-9 _ . : -``, prefixed with the plugin's name).
    :returns: ``None`` to abstain, or a Verdict.
    """


@hookspec
def mxgate_receive_on_disconnect(session: Session) -> None:
    """Called when the connection closed, for any reason. Notification only."""


# ============================================================================================================
# categorizer (Exchange's RoutingAgent)
# ============================================================================================================


# Every categorizer hook may also declare ``headers``: the message's header section as a read-only
# :class:`~mxgate.core.metadata.MessageHeaders` (case-insensitive ``headers.get("X-Route-To")``, ``get_all``, parsed
# once per delivery round and only if read). Receive-time facts are typed on the message: ``message.meta`` is a
# :class:`~mxgate.core.metadata.MessageMeta` (``listener``, ``inbound_connector``, ``client_ip``, ``helo``,
# ``tls_version``, ``auth_user``, ``internal``...), and ``message.meta.extra`` holds the keys receive hooks set with
# ``IncomingMessage.set_meta(key, value)`` at end of headers or end of data. The core's categorizer is
# :mod:`mxgate.core.routing`.


@hookspec
def mxgate_categorizer_on_submitted_message(message: QueuedMessage, headers: MessageHeaders) -> None:
    """Called when a queued message is first picked up for routing. Notification only (raising changes
    nothing for the message).

    :param message: the queued message; ``message.meta`` its receive-time metadata.
    :param headers: its header section, read-only.
    """


@hookspec(firstresult=True)
def mxgate_categorizer_resolve_recipient(
    message: QueuedMessage, recipient: Address, headers: MessageHeaders
) -> Sequence[Address] | None:
    """Rewrite or expand one recipient (aliases, distribution lists).

    Stops at the first non-None result. Not asked for the recipients of an expansion (``message.meta.categorized``):
    the new addresses go into a message of their own, and the original recipient is recorded as delivered.

    :param message: the queued message; ``message.meta`` its receive-time metadata.
    :param recipient: one due recipient.
    :param headers: the message's header section, read-only.
    :returns: ``None`` to keep the recipient, or the addresses that replace it (may be empty: drop it).

    Raising is as returning None: the next implementation is asked, else the recipient stays as it is.
    """


@hookspec(firstresult=True)
def mxgate_categorizer_resolve_route(
    message: QueuedMessage, recipient: Address, headers: MessageHeaders
) -> Route | None:
    """Choose the outbound connector for one recipient: the routing override.

    Stops at the first non-None result. The built-in ``trylast`` implementation picks the connector whose
    ``recipient_domains`` match most specifically (exact > ``*.example.com`` > ``*``; then ``cost``, then order).
    A route naming an outbound connector that does not exist or is disabled fails the recipient (``550 5.4.4``).
    Also asked for recipient callouts (``Runtime.callout``) at RCPT time, with a message that is not in the queue
    (``message.id == "callout"``, the envelope sender of the callout, empty meta and headers).

    :param message: the queued message; ``message.meta`` its receive-time metadata (the inbound connector it came
        in through: ``message.meta.inbound_connector``).
    :param recipient: one due recipient.
    :param headers: the message's header section, read-only.
    :returns: a Route, or ``None`` to let later implementations decide.

    Raising is as returning None: the next implementation (in the end the built-in one) decides.
    """


@hookspec
def mxgate_categorizer_on_routed_message(
    message: QueuedMessage, routes: Sequence[tuple[Address, Route]], headers: MessageHeaders
) -> None:
    """Called after every due recipient of a message has a route. Notification only.

    :param routes: each routed recipient with its route (recipients expanded or without a route are not in it).
    :param headers: the message's header section, read-only.
    """


# ============================================================================================================
# delivery (Exchange's DeliveryAgent) and TLS policy
# ============================================================================================================


@hookspec(firstresult=True)
def mxgate_delivery_resolve_next_hop(destination: Destination) -> NextHop | None:
    """Resolve the hosts to try for a destination (MX or smart hosts), with DNSSEC status.

    Stops at the first non-None result; the built-in MX/smart-host resolver is ``trylast``. Raising is as
    returning None: the next implementation answers (nobody: the destination is deferred, ``451 4.4.0``).
    """


@hookspec
def mxgate_delivery_resolve_tls_policy(destination: Destination, next_hop: NextHop) -> TlsPolicy | None:
    """Every policy plugin gives its opinion (DANE, MTA-STS, the connector's own ``tls`` setting).

    All results are collected. An applicable, enforcing policy's ``mx_patterns`` filter ALL the next hop's hosts
    (RFC 8461 section 4.1); then each host is decided on its own: among the applicable policies whose
    refinement for that host (``policy.hosts``, :class:`HostPolicy`) ``applies``, the highest ``precedence``
    decides (RFC 8461 section 2: DANE > MTA-STS > connector). Return ``HostPolicy(applies=False)`` for a host
    your policy has no opinion on (DANE: no secure TLSA) so that the next policy decides it. The highest
    applicable policy with a ``failure`` defers the destination; a host whose governing policy has a
    ``failure`` is skipped.

    :returns: a TlsPolicy, or ``None`` when this plugin has no opinion.

    Raising is as returning None: the hosts are decided by the other policies. A policy plugin that must not fail
    open catches its errors and returns a policy with ``failure`` set (the destination is deferred).
    """


@hookspec(firstresult=True)
def mxgate_delivery_on_tls_verify(
    attempt: AttemptContext, policy: TlsPolicy, chain: Sequence[x509.Certificate]
) -> PeerVerification | None:
    """Verify the peer after the handshake, under the per-host policy: ``policy`` is the one governing the host
    dialled and ``attempt.host_policy`` its refinement for that host (level, SNI, reference identifiers, the
    plugin's per-host ``data``). The plugin that issued the policy (``policy.source``) answers; others return
    None. The core's ``trylast`` implementation handles connector policies (WebPKI chain and RFC 6125 names).

    Stops at the first non-None result.

    :param chain: the certificates the peer presented, leaf first (not just the verified part).

    Raising is no answer: a policy that demanded verification and got no answer fails the host.
    """


@hookspec
def mxgate_delivery_on_tls_outcome(outcome: TlsOutcome) -> None:
    """One record per TLS attempt or per policy failure before any attempt. TLS-RPT and metrics consume it.

    A session kept open and reused for further messages (connection reuse) is one attempt: it is not reported
    again, and neither is ``on_tls_verify`` called again (TLS-RPT counts sessions).
    """


@hookspec
def mxgate_delivery_on_delivered(report: DeliveryReport) -> None:
    """Called once per recipient that the next hop accepted (2xx after DATA). Notification only.

    :param report: queue id, recipient, connector, the reply, the MX used, receipt and attempt times.
    """


@hookspec
def mxgate_delivery_on_deferred(report: DeliveryReport) -> None:
    """Called once per recipient whose attempt failed transiently (4xx, connection or TLS policy failure); it
    will be retried on the connector's schedule. Notification only.

    :param report: as for ``on_delivered``; ``reply`` says why.
    """


@hookspec
def mxgate_delivery_on_failed(report: DeliveryReport) -> None:
    """Called once per recipient that failed for good (5xx, or the retry schedule ran out); a DSN goes to the
    envelope sender unless that is the null sender. Notification only.

    :param report: as for ``on_delivered``; ``reply`` says why.
    """


# ============================================================================================================
# reporting
# ============================================================================================================


@hookspec
def mxgate_report_on_event(event: ReportEvent) -> None:
    """A countable event (connections, rejections, DNS lookups, STS fetches, TLS-RPT sends...). Metrics plugins
    turn these into series; the labels are bounded by contract (never domains or addresses).
    """


@hookspec
def mxgate_report_on_plugin_error(plugin: str, hook: str, error: BaseException) -> None:
    """A plugin's hook implementation raised. Called after the error was logged. Must not raise."""
