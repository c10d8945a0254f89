"""mxgate: an SMTP gateway with Exchange-style connectors and transport agents.

This module is the plugin author's API; everything else is internal and may change. It exports every type a hook
passes or returns (``Runtime``, ``QueuedMessage``, ``AttemptContext``, ``AuthResult``, ``OutboundConnector``...),
the verdicts, the outcome and policy types, ``ConfigError`` (what a plugin's setting validation raises), the
command helpers ``add_config_arg`` / ``load_from_args`` / ``command_runtime`` for
``mxgate_lifecycle_register_commands``, the DNS answer types with their DNSSEC status (``Resolver``, ``DnsAnswer``,
``DnssecStatus``, the self-test result under ``DNSSEC_SELF_TEST``), the outbound ``SmtpClient``, and the TLS helpers
a verifying plugin needs (``peer_chain``, ``client_context``, ``match_reference_identifiers``, ``own_subject``).
"""

from mxgate._version import __version__
from mxgate.connectors.outbound import OutboundConnector
from mxgate.core.auth import AuthResult
from mxgate.core.callout import CalloutResult, CalloutVerdict
from mxgate.core.commands import add_config_arg, command_runtime, load_from_args
from mxgate.core.delivery import AttemptContext
from mxgate.core.dns import DNSSEC_SELF_TEST, DnsAnswer, DnssecStatus, Resolver, SelfTestResult
from mxgate.core.errors import ConfigError, ConfigProblem, MxgateError
from mxgate.core.files import private_file
from mxgate.core.hookspecs import hookimpl
from mxgate.core.model import (
    Accept,
    Address,
    Disconnect,
    DsnNotify,
    DsnRet,
    Envelope,
    IncomingMessage,
    RecipientDsn,
    Reject,
    Reply,
    ReverseDnsStatus,
    Session,
    Stash,
    StashKey,
    TempFail,
    Verdict,
)
from mxgate.core.outcomes import (
    DeliveryReport,
    Destination,
    HopHost,
    HostPolicy,
    NextHop,
    PeerVerification,
    PolicyType,
    ReportEvent,
    Route,
    TlsLevel,
    TlsOutcome,
    TlsPolicy,
    TlsRptResult,
)
from mxgate.core.queue.store import MessageOptions, QueuedMessage, QueuedRecipient, RecipientStatus
from mxgate.core.runtime import ROLE_COMMAND, ROLE_MAIN, ROLE_RECEIVER, Runtime
from mxgate.core.settings import ConfigRegistry, ConnectorSetting, setting
from mxgate.core.smtp.client import SmtpClient, SmtpClientError, SmtpReply
from mxgate.core.tls import client_context, match_reference_identifiers, own_subject, peer_chain

__all__ = [
    "DNSSEC_SELF_TEST",
    "ROLE_COMMAND",
    "ROLE_MAIN",
    "ROLE_RECEIVER",
    "Accept",
    "Address",
    "AttemptContext",
    "AuthResult",
    "CalloutResult",
    "CalloutVerdict",
    "ConfigError",
    "ConfigProblem",
    "ConfigRegistry",
    "ConnectorSetting",
    "DeliveryReport",
    "Destination",
    "Disconnect",
    "DnsAnswer",
    "DnssecStatus",
    "DsnNotify",
    "DsnRet",
    "Envelope",
    "HopHost",
    "HostPolicy",
    "IncomingMessage",
    "MessageOptions",
    "MxgateError",
    "NextHop",
    "OutboundConnector",
    "PeerVerification",
    "PolicyType",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientDsn",
    "RecipientStatus",
    "Reject",
    "Reply",
    "ReportEvent",
    "Resolver",
    "ReverseDnsStatus",
    "Route",
    "Runtime",
    "SelfTestResult",
    "Session",
    "SmtpClient",
    "SmtpClientError",
    "SmtpReply",
    "Stash",
    "StashKey",
    "TempFail",
    "TlsLevel",
    "TlsOutcome",
    "TlsPolicy",
    "TlsRptResult",
    "Verdict",
    "__version__",
    "add_config_arg",
    "client_context",
    "command_runtime",
    "hookimpl",
    "load_from_args",
    "match_reference_identifiers",
    "own_subject",
    "peer_chain",
    "private_file",
    "setting",
]
