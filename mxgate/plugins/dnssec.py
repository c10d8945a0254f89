"""Built-in agent: DNSSEC-aware resolution for the delivery path (mode ``validating_resolver``).

At start-up it proves that the configured resolver validates: a known-secure name must come back secure and a
known-bogus name must fail validation (``[dns] self_test_secure`` / ``self_test_bogus``). The result is logged,
kept in ``runtime.stash[SELF_TEST]`` for the DANE agent and ``mxgate explain --dns``, and reported as the event
``dns_self_test`` (label ``result``: ``validating`` | ``not_validating``) for metrics. When the resolver does not
validate, DANE is reported unavailable instead of every signed domain looking forged.

The self-test runs in the background: listeners open at once; until it finishes, ``SELF_TEST`` is unset and DANE
treats the resolver as not (yet) proven.
"""

from __future__ import annotations

import asyncio
import logging

from mxgate.core.dns import SelfTestResult
from mxgate.core.hookspecs import hookimpl
from mxgate.core.model import StashKey
from mxgate.core.runtime import Runtime

name = "dnssec"
priority = 50

log = logging.getLogger(__name__)

SELF_TEST = StashKey[SelfTestResult]()


async def run_self_test(runtime: Runtime) -> SelfTestResult | None:
    """Run the self-test now, store and report its result."""
    if runtime.resolver is None:
        return None
    dns_conf = runtime.config.dns
    result = await runtime.resolver.self_test(dns_conf.self_test_secure, dns_conf.self_test_bogus)
    runtime.stash[SELF_TEST] = result
    fields = {
        "secure_name": result.secure_name,
        "secure_status": str(result.secure_status),
        "bogus_name": result.bogus_name,
        "bogus_status": str(result.bogus_status),
        "detail": result.detail,
    }
    if result.validating:
        log.info("DNSSEC self-test passed: the resolver validates", extra=fields)
    else:
        log.warning("DNSSEC self-test FAILED: the resolver does not validate; DANE is unavailable", extra=fields)
    await runtime.hooks.on_event("dns_self_test", result="validating" if result.validating else "not_validating")
    return result


@hookimpl
def mxgate_lifecycle_on_startup(runtime: Runtime) -> None:
    if runtime.resolver is not None:
        runtime.tasks.append(asyncio.ensure_future(run_self_test(runtime)))
