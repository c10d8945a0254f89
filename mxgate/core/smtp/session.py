"""The receive side's decisions, free of sockets (h11-style): limits, connector choice and re-evaluation, relay
rules, sender-domain restrictions, command sequencing, and the replies that say why.

:class:`ReceivePolicy` is built once per listener from the frozen configuration; :class:`ReceiveState` is one
connection's mutable state. The server (:mod:`mxgate.core.smtp.connection`) does the I/O and the hook calls and
asks the policy what to answer. Every reply carries an RFC 3463 enhanced code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mxgate.connectors.inbound import InboundConnector, select_inbound
from mxgate.connectors.outbound import select_outbound
from mxgate.core.checks import domain_matches
from mxgate.core.config import Config, ListenerConfig
from mxgate.core.model import Address, Envelope, Reply, TlsState
from mxgate.core.smtp.parse import MailCommand

__all__ = ["Limits", "R", "ReceivePolicy", "ReceiveState", "reject_reason"]


class R:
    """The core's own replies."""

    OK = Reply(250, "2.0.0", "Ok")
    SENDER_OK = Reply(250, "2.1.0", "Sender ok")
    RCPT_OK = Reply(250, "2.1.5", "Recipient ok")
    RESET = Reply(250, "2.0.0", "Reset")
    BYE = Reply(221, "2.0.0", "Bye")
    VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
    HELP = Reply(214, "2.0.0", "See RFC 5321")
    TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
    AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

    UNKNOWN = Reply(500, "5.5.2", "Command unrecognized")
    FOREIGN_PROTOCOL = Reply(221, "2.7.0", "This is an SMTP server, not for HTTP or proxy requests; goodbye")
    NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
    LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (the limit is 512 octets)")
    BARE_LF = Reply(500, "5.5.2", "Bare CR or LF in command; lines end with CRLF")
    BAD_UTF8 = Reply(500, "5.5.2", "Command is not valid UTF-8")
    NEED_EHLO = Reply(503, "5.5.1", "Send EHLO/HELO first")
    NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
    NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
    DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA cannot follow BDAT in the same transaction (RFC 3030)")
    BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT <octets> [LAST]; closing, the end of the chunk cannot be found")
    CHUNK_OK = Reply(250, "2.0.0", "Chunk received")
    NESTED_MAIL = Reply(503, "5.5.1", "Sender already given (RSET to start over)")
    NO_ARGS = Reply(501, "5.5.4", "No parameters allowed")
    EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")

    NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
    REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS session: issue STARTTLS first (RFC 8689)")
    TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
    TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")

    AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
    AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available")
    AUTH_DONE = Reply(503, "5.5.1", "Already authenticated")
    AUTH_IN_TX = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
    AUTH_MECH = Reply(504, "5.5.4", "Unrecognized authentication mechanism (PLAIN or LOGIN)")
    AUTH_BAD64 = Reply(501, "5.5.2", "Cannot decode the response (base64 expected)")
    AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
    AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
    AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
    AUTH_RATE = Reply(454, "4.7.0", "Too many failed authentication attempts from your address; try later")

    TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
    TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
    TEXT_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long in message text (the limit is 998 octets plus CRLF)")
    BARE_LF_DATA = Reply(550, "5.6.0", "Bare CR or LF in message text (SMTP smuggling protection); use CRLF")
    QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
    QUEUE_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
    PLUGIN_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")

    TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
    TOO_SLOW = Reply(421, "4.4.2", "Input too slow, closing connection")
    SESSION_TOO_LONG = Reply(421, "4.4.2", "Session too long, closing connection")
    TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
    SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    session_timeout: float
    max_errors: int
    soft_error_limit: int = 5
    error_sleep: float = 1.0
    recipient_overshoot: int = 1000
    command_timeout: float = 60.0
    min_data_rate: int = 500
    command_line: int = 512  # RFC 5321 §4.5.3.1.4, CRLF included
    auth_line: int = 12288  # RFC 4954 §4
    text_line: int = 1000  # §4.5.3.1.6, CRLF included (one more octet allowed for dot-stuffing)

    @classmethod
    def for_listener(cls, config: Config, listener: ListenerConfig) -> Limits:
        return cls(
            max_message_size=listener.max_message_size or config.server.max_message_size,
            max_recipients=listener.max_recipients or config.server.max_recipients,
            idle_timeout=listener.idle_timeout,
            session_timeout=listener.session_timeout,
            max_errors=listener.max_errors,
            soft_error_limit=listener.soft_error_limit,
            error_sleep=listener.error_sleep,
            recipient_overshoot=listener.recipient_overshoot_limit,
            command_timeout=listener.command_timeout,
            min_data_rate=listener.min_data_rate,
        )


@dataclass(slots=True)
class ReceiveState:
    """One connection's state (mutable; the server turns it into frozen ``Session`` snapshots for hooks)."""

    peer_ip: str
    tls: TlsState | None = None
    helo: str | None = None
    esmtp: bool = False
    auth_user: str | None = None
    connector: InboundConnector | None = None  # chosen for the connection
    tx_connector: InboundConnector | None = None  # applies to the current transaction (sender_domains scope)
    envelope: Envelope = field(default_factory=Envelope)
    errors: int = 0
    overshoot: int = 0  # RCPTs refused past max_recipients in this transaction
    deferred: Reply | None = None  # a failed connect/ehlo hook: transactions get this tempfail
    chunks: bytearray | None = None  # the message so far of a BDAT transaction (None: no BDAT yet)

    def reset_transaction(self) -> None:
        self.envelope = Envelope()
        self.chunks = None
        self.tx_connector = None
        self.overshoot = 0

    def reset_after_tls(self) -> None:
        """RFC 3207 §4.2: forget everything learnt before STARTTLS."""
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self.reset_transaction()


def _any_match(patterns: tuple[str, ...], domain: str) -> bool:
    return any(domain_matches(p, domain) for p in patterns)


class ReceivePolicy:
    """The decisions of one listener."""

    def __init__(self, config: Config, listener: ListenerConfig, *, tls_available: bool) -> None:
        self.config = config
        self.listener = listener
        self.limits = Limits.for_listener(config, listener)
        self.tls_available = tls_available
        self.hostname = config.server.hostname
        self.connectors = config.inbound_connector

    # --- greeting and EHLO -------------------------------------------------------------------------------------

    def banner(self) -> str:
        return f"220 {self.hostname} {self.listener.banner or 'ESMTP mxgate'}"

    @property
    def postmaster_domain(self) -> str:
        """Where ``RCPT TO:<Postmaster>`` goes: our first plain accepted domain, else our host name."""
        plain = [d for d in self.config.server.accepted_domains if not d.startswith("*")]
        return plain[0] if plain else self.hostname

    def auth_offered(self, state: ReceiveState) -> bool:
        return (
            self.listener.auth
            and state.auth_user is None
            and (state.tls is not None or self.listener.allow_plaintext_auth)
        )

    def size_limit(self, state: ReceiveState) -> int:
        """The message size limit in force: the listener's, lowered by the connector's ``max_message_size``."""
        conn = state.connector
        if conn is not None and conn.max_message_size is not None:
            return min(self.limits.max_message_size, conn.max_message_size)
        return self.limits.max_message_size

    def ehlo_lines(self, state: ReceiveState) -> list[str]:
        lines = [
            f"{self.hostname} Hello {state.helo} [{state.peer_ip}]",
            "PIPELINING",
            f"SIZE {self.size_limit(state)}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ]
        if state.tls is not None:
            lines.append("REQUIRETLS")  # RFC 8689 §2: offered only once TLS is in use
        if self.tls_available and state.tls is None:
            lines.append("STARTTLS")
        if self.auth_offered(state):
            lines.append("AUTH PLAIN LOGIN")
        return lines

    # --- connectors --------------------------------------------------------------------------------------------

    def select_connector(self, state: ReceiveState) -> InboundConnector | None:
        """At connect (IP only), again after STARTTLS (verified client certificate names) and after AUTH."""
        tls = state.tls
        return select_inbound(
            self.connectors,
            state.peer_ip,
            certificate_names=tls.peer_certificate_names if tls else (),
            certificate_verified=bool(tls and tls.peer_certificate_verified),
        )

    def may_relay(self, state: ReceiveState) -> bool:
        conn = state.tx_connector
        return state.auth_user is not None or bool(conn and conn.may_relay)

    # --- MAIL FROM ---------------------------------------------------------------------------------------------

    def check_mail(self, state: ReceiveState, mail: MailCommand) -> Reply | None:
        """Core checks for MAIL FROM; sets ``state.tx_connector``. ``None`` = go on to the hooks."""
        if state.helo is None:
            return R.NEED_EHLO
        if state.envelope.mail_from is not None:
            return R.NESTED_MAIL
        if self.listener.require_tls and state.tls is None:
            return R.NEED_TLS
        if mail.requiretls and state.tls is None:
            return R.REQUIRETLS_NEEDS_TLS
        if mail.size is not None and mail.size > self.size_limit(state):
            return R.TOO_BIG
        conn = state.connector
        if conn is not None and conn.require_tls and state.tls is None:
            return R.NEED_TLS  # the connector's name is ours: not for the remote sender (the tracking log has it)
        refused = self.sender_restriction(state, mail.sender)
        if refused is not None:
            return refused
        domain = mail.sender.domain
        if conn is not None and conn.sender_domains and not mail.sender.is_null:
            # a connector scoped to sender domains only speaks for those; other mail is anonymous internet mail
            state.tx_connector = conn if _any_match(conn.sender_domains, domain) else None
        else:
            state.tx_connector = conn
        return None

    def sender_restriction(self, state: ReceiveState, sender: Address) -> Reply | None:
        """Mail claiming a partner's domain from outside its IPs or without its certificate is refused (5.7.1)."""
        if sender.is_null:
            return None
        for conn in self.connectors:
            if not conn.enabled or not conn.sender_domains:
                continue
            if not (conn.restrict_domains_to_ips or conn.restrict_domains_to_certificate):
                continue
            if not _any_match(conn.sender_domains, sender.domain):
                continue
            if conn.restrict_domains_to_ips and not conn.matches_ip(state.peer_ip):
                return Reply(
                    550,
                    "5.7.1",
                    f"Mail from {sender.domain} is not accepted from this address",
                )
            if conn.restrict_domains_to_certificate and not self._has_certificate(state, conn):
                return Reply(
                    550,
                    "5.7.1",
                    f"Mail from {sender.domain} is only accepted over TLS with its sender's client certificate",
                )
        return None

    @staticmethod
    def _has_certificate(state: ReceiveState, conn: InboundConnector) -> bool:
        tls = state.tls
        if tls is None or not tls.peer_certificate_verified or not conn.tls_sender_certificate_name:
            return False
        return (
            select_inbound(
                [dataclasses.replace(conn, sender_ips=())],
                state.peer_ip,
                certificate_names=tls.peer_certificate_names,
                certificate_verified=True,
            )
            is not None
        )

    # --- RCPT TO -----------------------------------------------------------------------------------------------

    def accepts_domain(self, state: ReceiveState, domain: str) -> bool:
        """One of our domains (server-wide, or the connector's extra ``accepted_domains``)."""
        if _any_match(self.config.server.accepted_domains, domain):
            return True
        conn = state.tx_connector
        return bool(conn and _any_match(conn.accepted_domains, domain))

    def check_rcpt(self, state: ReceiveState, rcpt: Address) -> Reply | None:
        if state.envelope.mail_from is None:
            return R.NEED_MAIL
        if len(state.envelope.rcpt_tos) >= self.limits.max_recipients:
            return R.TOO_MANY_RCPTS
        domain = rcpt.domain
        may_relay = self.may_relay(state)
        if not self.accepts_domain(state, domain) and not may_relay:
            return Reply(550, "5.7.1", f"Relay access denied: we do not accept mail for {domain} from you")
        if not may_relay and any(c in rcpt.local for c in "%!@"):
            # sender-specified routing (percent hack, bang path, quoted @): an internal server behind us might
            # honour it and relay onward; only clients that may relay anyway get to use it (Postfix's
            # allow_untrusted_routing = no)
            return Reply(550, "5.7.1", "Sender-specified routing (%, ! or @ in the local part) is not allowed")
        if domain.startswith("["):
            return Reply(550, "5.1.2", "Address literals are not accepted as recipients")
        if select_outbound(self.config.outbound_connector, domain) is None:
            return Reply(550, "5.1.2", f"No route to {domain}: no outbound connector serves it")
        return None

    # --- DATA --------------------------------------------------------------------------------------------------

    def check_data(self, state: ReceiveState) -> Reply | None:
        if state.envelope.mail_from is None:
            return R.NEED_MAIL
        if not state.envelope.rcpt_tos:
            return R.NEED_RCPT
        if state.chunks is not None:
            return R.DATA_AFTER_BDAT
        return None

    def check_bdat(self, state: ReceiveState, size: int) -> Reply | None:
        """Before a BDAT chunk of ``size`` octets is read: ``None`` = keep it; else the reply, and the chunk is
        read and dropped (RFC 3030 §2: the chunk always follows its command, accepted or not)."""
        if self.listener.require_tls and state.tls is None:
            return R.NEED_TLS
        if state.helo is None:
            return R.NEED_EHLO
        if state.envelope.mail_from is None:
            return R.NEED_MAIL
        if not state.envelope.rcpt_tos:
            return R.NEED_RCPT
        so_far = len(state.chunks) if state.chunks is not None else 0
        if so_far + size > self.size_limit(state):  # SIZE counts the whole message, across chunks
            return R.TOO_BIG
        return None

    def check_text(self, raw: bytes) -> Reply | None:
        """The assembled message of a BDAT transaction (no dot-stuffing): the same rules as DATA -- CRLF only
        (SMTP smuggling), lines of at most 998 octets."""
        lf = raw.count(b"\n")
        if lf != raw.count(b"\r\n") or raw.count(b"\r") != lf:
            return R.BARE_LF_DATA
        if len(raw) > self.limits.text_line and max(map(len, raw.split(b"\r\n"))) > 998:
            return R.TEXT_LINE_TOO_LONG
        return None

    def check_auth(self, state: ReceiveState) -> Reply | None:
        if not self.listener.auth:
            return R.AUTH_UNAVAILABLE
        if state.tls is None and not self.listener.allow_plaintext_auth:
            return R.AUTH_NEEDS_TLS
        if state.helo is None or not state.esmtp:
            return R.NEED_EHLO
        if state.auth_user is not None:
            return R.AUTH_DONE
        if state.envelope.mail_from is not None:
            return R.AUTH_IN_TX
        return None

    def error(self, state: ReceiveState) -> bool:
        """Count one bad command; True when the client has used up its allowance (421 and close)."""
        state.errors += 1
        return state.errors >= self.limits.max_errors

    def counts_as_error(self, state: ReceiveState, reply: Reply) -> bool:
        """Whether a refused MAIL or RCPT counts towards ``max_errors``: permanent refusals (relay denied, sender
        restrictions, unknown recipients) do; 452 for too many recipients only past the overshoot allowance (a
        client that pipelines more than ``max_recipients`` is told to send the rest later, not punished);
        temporary refusals (greylisting, a failing plugin) do not."""
        if reply == R.TOO_MANY_RCPTS:
            state.overshoot += 1
            return state.overshoot > self.limits.recipient_overshoot
        return reply.code >= 500

    def error_delay(self, state: ReceiveState) -> float:
        """Seconds to wait before an error reply: 0 up to ``soft_error_limit`` errors, then ``error_sleep`` more
        for each further one (a dictionary attack slows down; a client with a typo does not notice)."""
        over = state.errors - self.limits.soft_error_limit
        return over * self.limits.error_sleep if over > 0 else 0.0


def reject_reason(reply: Reply) -> str:
    """A bounded label for ``message_rejected`` events."""
    if reply.enhanced == "5.7.1" and "Relay" in reply.text:
        return "relay"
    if reply.enhanced == "5.7.1":
        return "sender_restriction"
    if reply.code == 530:
        return "tls_required"
    if reply.enhanced == "5.3.4":
        return "size"
    if reply.enhanced == "5.6.0":
        return "smuggling"
    if reply.enhanced == "4.5.3":
        return "recipients"
    if reply.enhanced == "5.1.2":
        return "no_route"
    if reply.enhanced == "4.3.0":
        return "plugin"
    return "policy" if reply.code >= 500 else "tempfail"
