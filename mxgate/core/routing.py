"""The categorizer (Exchange's RoutingAgent): recipient expansion, the routing hooks, grouping by destination.

For the due recipients of one message, :func:`categorize` asks the categorizer hooks and returns a
:class:`RoutingPlan`, one decision per recipient, in queue order:

1. ``on_submitted_message`` when the message is picked up for the first time (:func:`first_pickup`);
2. ``resolve_recipient`` (firstresult), unless the message is itself an expansion (``meta.categorized``): an answer
   other than the recipient itself is :class:`Expanded` -- the new addresses travel in a message of their own (the
   scheduler queues it, marked categorized, and records the original recipient as delivered "expanded");
3. ``resolve_route`` (firstresult; the core's ``trylast`` default picks the most specific connector): a route to an
   enabled outbound connector is :class:`Routed`, with its :class:`~mxgate.core.outcomes.Destination` (connector +
   recipient domain, or the route's or connector's first smart host: :func:`destination_for`); anything else is
   :class:`Unroutable` (``550 5.4.4``);
4. ``on_routed_message`` with every route decided.

Every hook gets the message's headers as a read-only :class:`~mxgate.core.metadata.MessageHeaders` (``headers``)
and its receive-time :class:`~mxgate.core.metadata.MessageMeta` as ``message.meta``.

The plan is a value: nothing here queues, delivers or writes the tracking log. The scheduler
(:mod:`mxgate.core.queue.scheduler`) acts on it and keeps what is its own -- leases, delivery slots, semaphores,
retries, DSNs. Recipient callouts (:mod:`mxgate.core.callout`) route one address with :func:`route_recipient`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mxgate.core import checks
from mxgate.core.metadata import MessageHeaders
from mxgate.core.model import Address
from mxgate.core.outcomes import Destination, Route

if TYPE_CHECKING:
    from mxgate.connectors.outbound import OutboundConnector
    from mxgate.core.messages import QueuedMessage, QueuedRecipient
    from mxgate.core.plugins import Hooks

__all__ = [
    "Expanded",
    "Outbound",
    "RecipientDecision",
    "Routed",
    "RoutingPlan",
    "Unroutable",
    "categorize",
    "decide_route",
    "destination_for",
    "first_pickup",
    "is_rewrite",
    "parse_address",
    "route_recipient",
]


def parse_address(text: str) -> Address:
    """A queued recipient (or sender) as an :class:`Address`; ``""`` is the null address."""
    if not text:
        return Address.null()
    local, at, domain = text.rpartition("@")
    if not at:
        return Address(text, "")
    return Address(local, domain)


# -- decisions -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expanded:
    """``resolve_recipient`` replaced the recipient (an alias, a list); ``into`` is its answer (may be empty)."""

    recipient: str
    into: tuple[Address, ...]

    @property
    def new_recipients(self) -> tuple[str, ...]:
        """The addresses the new message goes to (the null address dropped)."""
        return tuple(str(a) for a in self.into if not a.is_null)

    @property
    def reply(self) -> str:
        """What the original recipient's record says (it counts as delivered)."""
        return f"250 2.1.5 expanded into {len(self.into)} recipient(s)"


@dataclass(frozen=True, slots=True)
class Routed:
    """The recipient goes through ``destination.connector`` to ``destination``."""

    recipient: str
    address: Address
    route: Route
    destination: Destination


@dataclass(frozen=True, slots=True)
class Unroutable:
    """No route (``route`` is None), or a route to an outbound connector that does not exist or is disabled."""

    recipient: str
    address: Address
    route: Route | None
    status: ClassVar[str] = "5.4.4"  # RFC 3463: bad routing

    @property
    def reply(self) -> str:
        """What the recipient's record (and its DSN) says."""
        if self.route is None:
            return f"550 5.4.4 no outbound connector routes {self.address.domain or self.recipient}"
        return f"550 5.4.4 outbound connector {self.route.connector!r} does not exist or is disabled"


RecipientDecision = Expanded | Routed | Unroutable
Outbound = Callable[[str], "OutboundConnector | None"]  # connector name -> connector (``config.outbound``)


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """One decision per due recipient, in queue order."""

    decisions: tuple[RecipientDecision, ...]

    @property
    def routes(self) -> tuple[tuple[Address, Route], ...]:
        """What ``on_routed_message`` gets: every routed recipient with its route."""
        return tuple((d.address, d.route) for d in self.decisions if isinstance(d, Routed))

    @property
    def groups(self) -> dict[Destination, tuple[str, ...]]:
        """Routed recipients by destination (one delivery transaction each), destinations in first-seen order."""
        out: dict[Destination, list[str]] = {}
        for d in self.decisions:
            if isinstance(d, Routed):
                out.setdefault(d.destination, []).append(d.recipient)
        return {dest: tuple(rcpts) for dest, rcpts in out.items()}

    def route_changes(self, recipients: Iterable[QueuedRecipient]) -> dict[str, str]:
        """Recipient -> connector name, for the routed recipients whose recorded route differs (the queue keeps
        it: ``queue show``, and the retry schedule of a later internal error)."""
        recorded = {r.address: r.route for r in recipients}
        return {
            d.recipient: d.destination.connector.name
            for d in self.decisions
            if isinstance(d, Routed) and recorded.get(d.recipient) != d.destination.connector.name
        }


def first_pickup(message: QueuedMessage) -> bool:
    """No recipient was attempted or routed yet: ``on_submitted_message`` is due."""
    return all(r.attempts == 0 and r.route is None for r in message.recipients)


def is_rewrite(recipient: str, answer: Sequence[Address] | None) -> bool:
    """``resolve_recipient`` answered something other than the recipient itself."""
    return answer is not None and [str(a) for a in answer] != [recipient]


def destination_for(connector: OutboundConnector, route: Route, address: Address) -> Destination:
    """Where a routed recipient goes: the route's (else the connector's) smart hosts, named by the first one;
    else the recipient's domain (lower case, no trailing dot) for an MX lookup."""
    smart = route.smart_hosts or connector.smart_hosts
    if not smart:
        return Destination(connector, address.domain.lower().rstrip("."), ())
    return Destination(connector, checks.split_hostport(smart[0], connector.port)[0].lower(), tuple(smart))


def decide_route(recipient: str, address: Address, route: Route | None, outbound: Outbound) -> Routed | Unroutable:
    """The decision for ``resolve_route``'s answer: routed when it names an enabled outbound connector
    (``outbound``: name -> connector, e.g. ``config.outbound``)."""
    connector = outbound(route.connector) if route is not None else None
    if route is None or connector is None or not connector.enabled:
        return Unroutable(recipient, address, route)
    return Routed(recipient, address, route, destination_for(connector, route, address))


# -- the hooks -------------------------------------------------------------------------------------------------


async def route_recipient(
    hooks: Hooks,
    outbound: Outbound,
    message: QueuedMessage,
    address: Address,
    headers: MessageHeaders | None = None,
) -> Routed | Unroutable:
    """``resolve_route`` for one address, decided (what a recipient callout uses)."""
    route = await hooks.resolve_route(message, address, headers if headers is not None else MessageHeaders())
    return decide_route(str(address), address, route, outbound)


async def categorize(
    hooks: Hooks,
    outbound: Outbound,
    message: QueuedMessage,
    pending: Sequence[QueuedRecipient],
    headers: MessageHeaders,
) -> RoutingPlan:
    """Run the categorizer hooks for the ``pending`` recipients of ``message``; see the module docstring.
    ``outbound``: connector name -> enabled or disabled connector, or None (``config.outbound``)."""
    if first_pickup(message):
        await hooks.on_submitted_message(message, headers)
    decisions: list[RecipientDecision] = []
    for r in pending:
        address = parse_address(r.address)
        if not message.meta.categorized:
            answer = await hooks.resolve_recipient(message, address, headers)
            if answer is not None and is_rewrite(r.address, answer):
                decisions.append(Expanded(r.address, tuple(answer)))
                continue
        route = await hooks.resolve_route(message, address, headers)
        decisions.append(decide_route(r.address, address, route, outbound))
    plan = RoutingPlan(tuple(decisions))
    routes = plan.routes
    if routes:
        await hooks.on_routed_message(message, routes, headers)
    return plan
