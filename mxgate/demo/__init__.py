"""``mxgate demo``: the gateway's main job, watched on loopback in a few seconds.

This module only registers the command. The demo itself (:mod:`mxgate.demo.story`) assembles its world from
:mod:`mxgate.testing` — the DNS lab (nsd + unbound), the test CA, the SMTP sinks — and is imported only when the
command runs: building the command line, and every other command, never loads mxgate.testing or pytest.

Why a module of its own, added to the command line by the program (``mxgate/__main__.py`` passes
:func:`register_cli` to :func:`mxgate.core.cli.main`; the core does not import the demo) and not as a plugin
through ``mxgate_lifecycle_register_commands``: a plugin is loaded into every running gateway, listed by
``mxgate plugins`` and can be disabled or lost with a broken configuration file; the demo needs no
configuration at all and is no transport agent.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

DESCRIPTION = """\
Watch what mxgate is for, on this machine, without internet: start a DNS lab (signed zones served by nsd,
validated by unbound), SMTP servers with certificates from a throw-away test CA, an MTA-STS policy server (HTTPS)
and a gateway, all on 127.0.0.0/8; send four messages and tell their story:
  1. a DNSSEC-signed domain whose TLSA record (3 1 1) matches its MX's certificate: delivered over DANE-EE;
  2. a signed domain whose TLSA record does not match: held in the queue (deferred, not bounced);
  3. an MTA-STS enforce domain with a forged MX record: the forged MX gets nothing;
  4. an unsigned domain: delivered with opportunistic TLS.
Then the day's TLS-RPT report (as `mxgate tlsrpt show` prints it) and the `mxgate trace` of the held message.
Everything it started is stopped and its temporary directory removed. Needs nsd and unbound (`make deps`) and
the test extra (`make venv`); takes a few seconds (each wait is bounded). Exit status 0 when every outcome
was as described, 1 otherwise (with one line on standard error saying what went wrong)."""


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="watch DANE, MTA-STS and TLS-RPT at work on loopback (DNS lab, SMTP sinks, a gateway; a few seconds)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (configuration, certificates, zones, gateway log, state) and say where",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():  # dnspython's DSA support, imported with its DNSSEC module: not ours to fix
            warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"dns\.")
            from mxgate.demo import story
    except ModuleNotFoundError as exc:  # mxgate.testing needs the test extra (pytest, pytest-asyncio)
        print(f"mxgate demo: needs the test extra (`make venv`, or pip install 'mxgate[test]'): {exc}", file=sys.stderr)
        return 1
    return story.main(keep=args.keep)
