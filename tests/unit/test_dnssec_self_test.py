"""The start-up self-test asks again when the answer is indeterminate, and stops asking once it has a verdict."""

from __future__ import annotations

from typing import Any

from mxgate import DNSSEC_SELF_TEST
from mxgate.core import bootstrap
from mxgate.core.dns_answers import DnssecStatus, SelfTestResult
from mxgate.core.runtime import Runtime
from mxgate.plugins.dnssec import SELF_TEST, run_self_test

S, B, U = DnssecStatus.SECURE, DnssecStatus.BOGUS, DnssecStatus.INDETERMINATE


class ScriptedSelfTest:
    """Stands in for the resolver's self_test: the lab cannot make unbound answer 'indeterminate' on demand."""

    def __init__(self, *answers: tuple[DnssecStatus, DnssecStatus]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def self_test(self, secure: str, bogus: str) -> SelfTestResult:
        self.calls += 1
        s, b = self.answers.pop(0)
        return SelfTestResult(s is S and b is B, secure, bogus, s, b, "")


def runtime_with(resolver: Any, tmp_path: Any) -> Runtime:
    (tmp_path / "mx.toml").write_text(f'[server]\nstate_dir = "{tmp_path}"\n')
    config, plugins = bootstrap.load(tmp_path / "mx.toml", entry_points=False)
    runtime = Runtime.create(config, plugins)
    runtime.resolver = resolver
    return runtime


async def test_indeterminate_is_asked_again(tmp_path: Any) -> None:
    fake = ScriptedSelfTest((U, B), (S, U), (S, B))
    runtime = runtime_with(fake, tmp_path)
    result = await run_self_test(runtime, retry_delay=0)
    assert fake.calls == 3 and result is not None and result.validating
    assert runtime.stash[SELF_TEST].validating
    assert SELF_TEST is DNSSEC_SELF_TEST  # the core's public key: DANE reads it without importing this plugin
    runtime.tracking.close()


async def test_a_clear_negative_verdict_is_not_retried(tmp_path: Any) -> None:
    fake = ScriptedSelfTest((S, S))  # the bogus name resolved: the resolver does not validate
    runtime = runtime_with(fake, tmp_path)
    result = await run_self_test(runtime, retry_delay=0)
    assert fake.calls == 1 and result is not None and not result.validating
    runtime.tracking.close()


async def test_gives_up_after_three_indeterminate_answers(tmp_path: Any) -> None:
    fake = ScriptedSelfTest((U, U), (U, U), (U, U), (S, B))
    runtime = runtime_with(fake, tmp_path)
    result = await run_self_test(runtime, retry_delay=0)
    assert fake.calls == 3 and result is not None and not result.validating
    runtime.tracking.close()
