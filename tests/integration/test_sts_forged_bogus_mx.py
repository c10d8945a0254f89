"""MTA-STS enforce must survive a forged MX whose own lookups are DNSSEC-bogus (DESIGN: "an attacker who forges an MX
... must never obtain a weaker policy"; RFC-CHECKLIST 36-38). Found while writing ``mxgate demo`` and pinned on the
demo's world: ``shop.test`` (unsigned, MTA-STS enforce, ``mx: mx.shop.test``) whose real MX presents a certificate
no CA vouches for (an on-path attacker's), once as published and once with a forged extra MX in a zone with broken
signatures (any attacker can publish one).

Before issue 17 the second case was delivered: the DANE agent answered the bogus host with an applicable policy
(precedence 300) and one destination-wide combination let that opinion decide for every host, so the MTA-STS policy
(mx filter, WebPKI) was dropped and mx.shop.test was accepted "untrusted". Policy is now decided per host.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mxgate.demo import story
from mxgate.testing.ca import self_signed

pytestmark = pytest.mark.integration


def _world(tmp_path: Path, *, bogus_mx: bool) -> story.World:
    world = story.build_world(tmp_path)
    world.certs[story.SHOP_MX] = self_signed(tmp_path / "mitm", [story.SHOP_MX])  # an on-path attacker's
    if bogus_mx:
        shop = world.lab.get(story.SHOP)
        shop.remove("@", "MX")
        shop.add("@", "MX", "5 mx.evil.test.").add("@", "MX", "10 mx")
        world.lab.zone("evil.test", corrupt="signature").add("mx", "A", story.MX_IPS[story.FORGED_MX])
    return world


def _play(world: story.World) -> story.Played:
    world.lab.start()
    try:
        world.lab.wait_validating(story.BANK, story.SELF_TEST_BOGUS)
        return asyncio.run(story.play(world))
    finally:
        world.lab.stop()


def _shop(played: story.Played) -> story.Scene:
    return next(s for s in played.scenes if s.domain == story.SHOP)


def test_enforce_refuses_an_untrusted_certificate(tmp_path: Path) -> None:
    played = _play(_world(tmp_path, bogus_mx=False))
    scene = _shop(played)
    assert scene.fate is not None and scene.fate.result == "deferred", scene.fate
    assert played.received[story.SHOP_MX] == ()


def test_a_forged_mx_in_a_bogus_zone_does_not_switch_enforce_off(tmp_path: Path) -> None:
    played = _play(_world(tmp_path, bogus_mx=True))
    scene = _shop(played)
    assert played.received[story.SHOP_MX] == (), [(o.mx_host, o.policy_type, o.verification) for o in scene.outcomes]
    assert scene.fate is not None and scene.fate.result == "deferred", scene.fate
