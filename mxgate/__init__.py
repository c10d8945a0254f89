"""mxgate: an SMTP gateway with Exchange-style connectors and transport agents.

This module is the plugin author's API, the only one: the built-in plugins and the examples import nothing deeper
(``tests/unit/test_public_api.py`` holds them to it), so a third party can write any of them with it. Everything
else is internal and may change. It exports, grouped as ``__all__`` is:

- the hook contract: ``hookimpl``, every type a hook passes or returns (``Runtime``, ``Session``, ``Envelope``,
  ``QueuedMessage``, ``AttemptContext``, ``AuthResult``, ``OutboundConnector``...), the verdicts, the outcome and
  policy types, ``StashKey`` and the stash keys the core fills (``DNSSEC_SELF_TEST``), and what categorizer and
  delivery hooks read of a message: its typed metadata (``MessageMeta``, with the ``extra`` keys a receive hook set
  through ``IncomingMessage.set_meta``) and its headers (``MessageHeaders``);
- configuration: ``setting``, ``ConfigRegistry``, ``ConnectorSetting``, ``Config``, ``ConfigError`` (what a
  plugin's validation raises) and the setting checks (``check_*`` for ``setting(check=...)``, ``is_hostname``...);
- the process roles (``ROLE_MAIN``, ``ROLE_RECEIVER``, ``ROLE_COMMAND``; ``Runtime.role``);
- commands (``mxgate_lifecycle_register_commands``): ``add_config_arg``, ``load_from_args``, ``command_runtime``;
- services a built-in uses and a third party may too: the DNS resolver with DNSSEC status (``Resolver``,
  ``DnsAnswer``, ``DnssecStatus``), the outbound ``SmtpClient``, TLS contexts and checks (``client_context``,
  ``server_context``, ``verify_webpki``, ``peer_chain``...), the cluster's shared database (``SharedDb``,
  ``MigrationRegistry``, ``ClusterUnavailable``), ``private_file``, ``escape`` for network text on a terminal, and
  the small HTTP/1.1 server a plugin's own endpoint runs on (``HttpServer``, ``HttpRouter``, ``HttpRequest``,
  ``HttpResponse``).
"""

from mxgate._version import __version__
from mxgate.connectors.outbound import OutboundConnector
from mxgate.core.checks import check_hostname, check_optional_hostport, check_positive, is_hostname, split_hostport
from mxgate.core.cluster_db import ClusterUnavailable, SharedDb
from mxgate.core.commands import add_config_arg, command_runtime, load_from_args
from mxgate.core.config import Config
from mxgate.core.dns import Resolver, resolver_from_config
from mxgate.core.dns_answers import DNSSEC_SELF_TEST, DnsAnswer, DnssecStatus, SelfTestResult
from mxgate.core.errors import ConfigError, ConfigProblem, MxgateError
from mxgate.core.files import private_file
from mxgate.core.hookspecs import hookimpl
from mxgate.core.http import HttpRouter, HttpServer
from mxgate.core.http_wire import HttpConnection, HttpLimits, HttpRequest, HttpResponse
from mxgate.core.messages import MessageOptions, QueuedMessage, QueuedRecipient, RecipientStatus
from mxgate.core.metadata import MessageHeaders, MessageMeta
from mxgate.core.migrations import MigrationRegistry
from mxgate.core.model import (
    Accept,
    Address,
    AuthResult,
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
    AttemptContext,
    CalloutResult,
    CalloutVerdict,
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
from mxgate.core.queue.queries import QueueCounts
from mxgate.core.runtime import RECEIVE_WORKER_PIDS, ROLE_COMMAND, ROLE_MAIN, ROLE_RECEIVER, Runtime
from mxgate.core.settings import ConfigRegistry, ConnectorSetting, setting
from mxgate.core.smtp.client import SmtpClient, SmtpClientError, SmtpReply
from mxgate.core.textsafe import escape
from mxgate.core.tls import (
    VerifyReason,
    VerifyResult,
    client_context,
    match_reference_identifiers,
    normalize_dns_name,
    own_subject,
    peer_chain,
    server_context,
    verify_webpki,
)

__all__ = [
    "DNSSEC_SELF_TEST",
    "RECEIVE_WORKER_PIDS",
    "ROLE_COMMAND",
    "ROLE_MAIN",
    "ROLE_RECEIVER",
    "Accept",
    "Address",
    "AttemptContext",
    "AuthResult",
    "CalloutResult",
    "CalloutVerdict",
    "ClusterUnavailable",
    "Config",
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
    "HttpConnection",
    "HttpLimits",
    "HttpRequest",
    "HttpResponse",
    "HttpRouter",
    "HttpServer",
    "IncomingMessage",
    "MessageHeaders",
    "MessageMeta",
    "MessageOptions",
    "MigrationRegistry",
    "MxgateError",
    "NextHop",
    "OutboundConnector",
    "PeerVerification",
    "PolicyType",
    "QueueCounts",
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
    "SharedDb",
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
    "VerifyReason",
    "VerifyResult",
    "__version__",
    "add_config_arg",
    "check_hostname",
    "check_optional_hostport",
    "check_positive",
    "client_context",
    "command_runtime",
    "escape",
    "hookimpl",
    "is_hostname",
    "load_from_args",
    "match_reference_identifiers",
    "normalize_dns_name",
    "own_subject",
    "peer_chain",
    "private_file",
    "resolver_from_config",
    "server_context",
    "setting",
    "split_hostport",
    "verify_webpki",
]
