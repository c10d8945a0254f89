"""Built-in agent: DNSSEC-aware resolution for the delivery path (mode ``validating_resolver``).

At start-up it proves that the configured resolver validates: a known-secure name must come back secure and a
known-bogus name must fail validation (``[dns] self_test_secure`` / ``self_test_bogus``). The result is logged,
kept in ``runtime.stash[mxgate.DNSSEC_SELF_TEST]`` (the core's key: the DANE agent reads it without importing
this plugin), and reported as the event ``dns_self_test`` (label ``result``: ``validating`` |
``not_validating``) for metrics. When the resolver does not
validate, DANE is reported unavailable instead of every signed domain looking forged.

The self-test runs in the background and again every hour: listeners open at once. Indeterminate answers (a
resolver that has just started, a lost packet) are asked again up to three times before the verdict. Until the
first verdict, ``DNSSEC_SELF_TEST`` is unset and the DANE agent relies on each answer's own status (a secure answer
carries its own proof; mandatory DANE defers without one).
"""

from __future__ import annotations

import asyncio
import logging

from mxgate import DNSSEC_SELF_TEST, ROLE_MAIN, DnssecStatus, Runtime, SelfTestResult, hookimpl

name = "dnssec"
priority = 50

log = logging.getLogger(__name__)

#: The stash key the result is kept under; the key itself is the core's (:data:`mxgate.DNSSEC_SELF_TEST`), so that
#: an agent reading it (DANE) needs no import of this plugin. Kept under this name for existing callers.
SELF_TEST = DNSSEC_SELF_TEST


RETRIES = 3  # an indeterminate answer (a resolver just started, a lost packet) is asked again
RETRY_DELAY = 1.0
RERUN_INTERVAL = 3600.0  # the result is proven again every hour: a resolver can stop validating


async def run_self_test(runtime: Runtime, *, retry_delay: float = RETRY_DELAY) -> SelfTestResult | None:
    """Run the self-test now (retrying indeterminate answers), store and report its result."""
    if runtime.resolver is None:
        return None
    dns_conf = runtime.config.dns
    for attempt in range(RETRIES):
        result = await runtime.resolver.self_test(dns_conf.self_test_secure, dns_conf.self_test_bogus)
        undecided = DnssecStatus.INDETERMINATE in (result.secure_status, result.bogus_status)
        if result.validating or not undecided or attempt == RETRIES - 1:
            break
        await asyncio.sleep(retry_delay * (attempt + 1))
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


async def _self_test_loop(runtime: Runtime) -> None:
    while True:
        try:
            await run_self_test(runtime)
        except Exception:  # never let the loop die; the next run tries again
            log.exception("DNSSEC self-test failed to run")
        await asyncio.sleep(RERUN_INTERVAL)


@hookimpl
def mxgate_lifecycle_on_startup(runtime: Runtime) -> None:
    if runtime.resolver is not None and runtime.role == ROLE_MAIN:  # DANE is decided in the main process
        runtime.tasks.append(asyncio.ensure_future(_self_test_loop(runtime)))


@hookimpl
async def mxgate_lifecycle_on_preflight(runtime: Runtime) -> list[str]:
    """``mxgate check``: the resolver must validate (the same self-test the gateway runs at start)."""
    result = await run_self_test(runtime, retry_delay=0.5)
    if result is None or result.validating:
        return []
    return [
        f"dns.resolvers: the resolver does not validate DNSSEC ({result.secure_name}: {result.secure_status}, "
        f"expected secure; {result.bogus_name}: {result.bogus_status}, expected bogus): DANE would be unavailable"
    ]
