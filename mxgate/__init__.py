"""mxgate: an SMTP gateway with Exchange-style connectors and transport agents.

This module is the plugin author's API; everything else is internal and may change. It exports every type a hook
passes or returns (``Runtime``, ``QueuedMessage``, ``AttemptContext``, ``AuthResult``...),
the verdicts, the outcome and policy types, ``ConfigError`` (what a plugin's setting validation raises), the
``check_*`` validators for ``setting(check=...)``, the process roles (``ROLE_MAIN``...), the cluster store
(``SharedDb``, ``ClusterUnavailable``, ``MigrationRegistry``), ``Resolver``, ``server_context``, ``escape`` (network
text for a terminal), and the command helpers ``add_config_arg`` / ``load_from_args`` / ``command_runtime`` for
``mxgate_lifecycle_register_commands``.
"""

from mxgate._version import __version__
from mxgate.core.auth import AuthResult
from mxgate.core.callout import CalloutResult, CalloutVerdict
from mxgate.core.checks import check_hostname, check_optional_hostport, check_positive
from mxgate.core.cluster import ClusterUnavailable, MigrationRegistry, SharedDb
from mxgate.core.commands import add_config_arg, command_runtime, load_from_args
from mxgate.core.delivery import AttemptContext
from mxgate.core.dns import Resolver
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
from mxgate.core.textsafe import escape
from mxgate.core.tls import server_context

# plain sorted() order, as tests check (ruff's isort-style order would put the ROLE_* constants first)
__all__ = [  # noqa: RUF022
    "Accept",
    "Address",
    "AttemptContext",
    "AuthResult",
    "CalloutResult",
    "CalloutVerdict",
    "ClusterUnavailable",
    "ConfigError",
    "ConfigProblem",
    "ConfigRegistry",
    "ConnectorSetting",
    "DeliveryReport",
    "Destination",
    "Disconnect",
    "DsnNotify",
    "DsnRet",
    "Envelope",
    "HostPolicy",
    "IncomingMessage",
    "MessageOptions",
    "MigrationRegistry",
    "MxgateError",
    "NextHop",
    "PeerVerification",
    "PolicyType",
    "QueuedMessage",
    "QueuedRecipient",
    "ROLE_COMMAND",
    "ROLE_MAIN",
    "ROLE_RECEIVER",
    "RecipientDsn",
    "RecipientStatus",
    "Reject",
    "Reply",
    "ReportEvent",
    "Resolver",
    "ReverseDnsStatus",
    "Route",
    "Runtime",
    "Session",
    "SharedDb",
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
    "check_hostname",
    "check_optional_hostport",
    "check_positive",
    "command_runtime",
    "escape",
    "hookimpl",
    "load_from_args",
    "private_file",
    "server_context",
    "setting",
]
