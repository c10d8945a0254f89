"""The categorizer (``mxgate/core/routing.py``) without a queue or a socket: its hooks through the real dispatcher,
connectors as values, the plan it returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mxgate import (
    Address,
    MessageHeaders,
    MessageMeta,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
    Route,
    hookimpl,
)
from mxgate.connectors.outbound import OutboundConnector
from mxgate.core import routing
from mxgate.core.outcomes import Destination
from mxgate.core.plugins import Dispatcher, Hooks, build_plugins

MX = OutboundConnector(name="internet", recipient_domains=("*",), use_mx=True)
RELAY = OutboundConnector(name="relay", recipient_domains=("example.net",), smart_hosts=("Relay.Example.com:2525",))
OFF = OutboundConnector(name="off", recipient_domains=("off.example",), enabled=False)
CONNECTORS = {c.name: c for c in (MX, RELAY, OFF)}
HEADERS = MessageHeaders.of_message(b"Subject: hi\r\nX-Route-To: relay\r\n\r\nbody\r\n")


NO_META = MessageMeta()


def message(*addresses: str, meta: MessageMeta = NO_META, attempts: int = 0, route: str | None = None) -> QueuedMessage:
    rcpts = tuple(QueuedRecipient(a, RecipientStatus.QUEUED, attempts, None, route, 0.0) for a in addresses)
    return QueuedMessage("Q1", "s@example.org", rcpts, 0.0, 10, None, False, meta)


class Agent:
    """Routes by domain (``reroute``), expands (``expand``), routes by header, and records what it saw."""

    name = "agent"

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.expand: dict[str, list[Address]] = {}
        self.reroute: dict[str, Route] = {}

    @hookimpl
    def mxgate_categorizer_on_submitted_message(self, message: QueuedMessage, headers: MessageHeaders) -> None:
        self.seen.append(("submitted", headers.get("subject")))

    @hookimpl
    def mxgate_categorizer_resolve_recipient(self, recipient: Address) -> Sequence[Address] | None:
        self.seen.append(("recipient", str(recipient)))
        return self.expand.get(str(recipient))

    @hookimpl
    def mxgate_categorizer_resolve_route(
        self, message: QueuedMessage, recipient: Address, headers: MessageHeaders
    ) -> Route | None:
        if message.meta.extra.get("agent.by-header") == "yes" and headers.get("x-route-to"):
            return Route(headers.get("x-route-to") or "")
        return self.reroute.get(recipient.domain, Route("internet"))

    @hookimpl
    def mxgate_categorizer_on_routed_message(self, routes: Sequence[tuple[Address, Route]]) -> None:
        self.seen.append(("routed", [f"{a}->{r.connector}" for a, r in routes]))


def hooks_with(agent: Agent) -> Hooks:
    return Hooks(Dispatcher(build_plugins(entry_points=False, extra=[("agent", agent)])))


async def categorize(agent: Agent, msg: QueuedMessage, headers: MessageHeaders = HEADERS) -> routing.RoutingPlan:
    return await routing.categorize(hooks_with(agent), CONNECTORS.get, msg, msg.recipients, headers)


# -- pure decisions ----------------------------------------------------------------------------------------------


def test_destination_is_the_domain_or_the_first_smart_host() -> None:
    assert routing.destination_for(MX, Route("internet"), Address("a", "Example.ORG.")) == Destination(
        MX, "example.org", ()
    )
    assert routing.destination_for(RELAY, Route("relay"), Address("a", "example.net")) == Destination(
        RELAY, "relay.example.com", ("Relay.Example.com:2525",)
    )
    # a route's own smart hosts win over the connector's
    assert routing.destination_for(RELAY, Route("relay", ("[2001:db8::1]:26",)), Address("a", "x.test")) == (
        Destination(RELAY, "2001:db8::1", ("[2001:db8::1]:26",))
    )


def test_a_route_needs_an_enabled_connector() -> None:
    rcpt = Address("a", "off.example")
    assert routing.decide_route("a@off.example", rcpt, None, CONNECTORS.get).reply == (  # type: ignore[union-attr]
        "550 5.4.4 no outbound connector routes off.example"
    )
    for route in (Route("off"), Route("nonesuch")):
        decision = routing.decide_route("a@off.example", rcpt, route, CONNECTORS.get)
        assert isinstance(decision, routing.Unroutable)
        assert decision.reply == f"550 5.4.4 outbound connector {route.connector!r} does not exist or is disabled"
    routed = routing.decide_route("a@off.example", rcpt, Route("internet"), CONNECTORS.get)
    assert routed == routing.Routed("a@off.example", rcpt, Route("internet"), Destination(MX, "off.example"))


def test_expansion_helpers() -> None:
    assert not routing.is_rewrite("a@x.test", None)
    assert not routing.is_rewrite("a@x.test", [Address("a", "x.test")])  # itself: no expansion
    assert routing.is_rewrite("a@x.test", [])
    expanded = routing.Expanded("list@x.test", (Address("b", "x.test"), Address.null()))
    assert expanded.new_recipients == ("b@x.test",)
    assert expanded.reply == "250 2.1.5 expanded into 2 recipient(s)"
    assert routing.parse_address("") == Address.null()
    assert routing.parse_address("a@b@c.test") == Address("a@b", "c.test")
    assert routing.parse_address("postmaster") == Address("postmaster", "")


# -- the hooks ---------------------------------------------------------------------------------------------------


async def test_recipients_are_grouped_by_destination_in_queue_order() -> None:
    agent = Agent()
    agent.reroute = {"example.net": Route("relay"), "off.example": Route("off")}
    msg = message("a@example.org", "b@example.net", "c@Example.org", "d@off.example", "e@example.net")
    plan = await categorize(agent, msg)
    assert plan.groups == {
        Destination(MX, "example.org"): ("a@example.org", "c@Example.org"),
        Destination(RELAY, "relay.example.com", RELAY.smart_hosts): ("b@example.net", "e@example.net"),
    }
    (unroutable,) = [d for d in plan.decisions if isinstance(d, routing.Unroutable)]
    assert unroutable.recipient == "d@off.example" and unroutable.status == "5.4.4"
    assert [d.recipient for d in plan.decisions] == [r.address for r in msg.recipients]
    assert plan.route_changes(msg.recipients) == {
        "a@example.org": "internet",
        "b@example.net": "relay",
        "c@Example.org": "internet",
        "e@example.net": "relay",
    }
    assert agent.seen[0] == ("submitted", "hi")
    assert agent.seen[-1] == (
        "routed",
        ["a@example.org->internet", "b@example.net->relay", "c@Example.org->internet", "e@example.net->relay"],
    )


async def test_a_route_already_recorded_is_no_change_and_a_retry_is_no_new_submission() -> None:
    agent = Agent()
    msg = message("a@example.org", attempts=1, route="internet")
    plan = await categorize(agent, msg)
    assert plan.route_changes(msg.recipients) == {}
    assert [s[0] for s in agent.seen] == ["recipient", "routed"]  # no "submitted": picked up before


async def test_expansion_is_a_decision_and_an_expanded_message_is_not_expanded_again() -> None:
    agent = Agent()
    agent.expand = {"list@example.org": [Address("x", "example.org"), Address("y", "example.net")]}
    plan = await categorize(agent, message("list@example.org", "a@example.org"))
    expanded, routed = plan.decisions
    assert expanded == routing.Expanded("list@example.org", (Address("x", "example.org"), Address("y", "example.net")))
    assert isinstance(routed, routing.Routed) and plan.routes == ((Address("a", "example.org"), Route("internet")),)

    agent = Agent()
    agent.expand = {"list@example.org": [Address("x", "example.org")]}
    plan = await categorize(agent, message("list@example.org", meta=MessageMeta(categorized=True)))
    assert isinstance(plan.decisions[0], routing.Routed)
    assert not [s for s in agent.seen if s[0] == "recipient"]  # resolve_recipient not asked


async def test_hooks_read_headers_and_the_metadata_a_receive_hook_set() -> None:
    agent = Agent()
    tagged = message("a@example.org", meta=MessageMeta(inbound_connector="partner", extra={"agent.by-header": "yes"}))
    plan = await categorize(agent, tagged)
    assert plan.routes == ((Address("a", "example.org"), Route("relay")),)  # X-Route-To: relay
    plan = await categorize(agent, message("a@example.org"))  # not tagged at receive: the header is not obeyed
    assert plan.routes == ((Address("a", "example.org"), Route("internet")),)


async def test_nothing_routed_means_no_routed_notification() -> None:
    agent = Agent()
    agent.reroute = {"off.example": Route("off")}
    plan = await categorize(agent, message("a@off.example"))
    assert plan.groups == {} and plan.routes == ()
    assert [s[0] for s in agent.seen] == ["submitted", "recipient"]


async def test_route_recipient_is_one_decision_with_empty_headers() -> None:
    seen: list[int] = []

    class Probe:
        name = "probe"

        @hookimpl
        def mxgate_categorizer_resolve_route(self, headers: MessageHeaders) -> Route:
            seen.append(len(headers))
            return Route("relay")

    hooks = Hooks(Dispatcher(build_plugins(entry_points=False, extra=[("probe", Probe())])))
    decision = await routing.route_recipient(hooks, CONNECTORS.get, message("a@x.test"), Address("a", "x.test"))
    assert isinstance(decision, routing.Routed) and decision.destination.domain == "relay.example.com"
    assert seen == [0]
