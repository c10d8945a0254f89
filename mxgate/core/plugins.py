"""The plugin manager: built-ins, entry points (group ``mxgate``), ``[plugins] load``, priority, disable —
and the async dispatcher pluggy lacks.

pluggy does not await coroutines (a firstresult hook with ``async def`` implementations would return the first
coroutine object and never run the rest), so :class:`Dispatcher` walks ``get_hookimpls()`` in pluggy's call
order itself, passes each implementation only the arguments it names, awaits awaitables, stops at the first
non-None result for firstresult hooks, and times every call. :class:`Hooks` is the typed facade over it: one
method per hook, so mypy checks every call site.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from mxgate.core import hookspecs
from mxgate.core.errors import PluginError
from mxgate.core.metadata import MessageHeaders
from mxgate.core.model import VERDICT_TYPES, Address, Envelope, IncomingMessage, Session, Verdict
from mxgate.core.outcomes import (
    DeliveryReport,
    Destination,
    NextHop,
    PeerVerification,
    ReportEvent,
    Route,
    TlsOutcome,
    TlsPolicy,
)
from mxgate.core.settings import ConfigRegistry

if TYPE_CHECKING:
    from cryptography import x509

    from mxgate.core.messages import QueuedMessage
    from mxgate.core.model import AuthResult
    from mxgate.core.outcomes import AttemptContext
    from mxgate.core.runtime import Runtime

log = logging.getLogger(__name__)

DEFAULT_PRIORITY = 100

# Built-in agents: registered exactly like third-party plugins (also declared as entry points of this
# distribution); listed here too so that a source checkout without installed metadata still finds them.
BUILTIN_PLUGINS: dict[str, str] = {
    "dnssec": "mxgate.plugins.dnssec",
    "dane": "mxgate.plugins.dane:DanePlugin",
    "mta_sts": "mxgate.plugins.mta_sts:MtaStsPlugin",
    "tlsrpt": "mxgate.plugins.tlsrpt:TlsRptPlugin",
    "prometheus": "mxgate.plugins.prometheus:PrometheusPlugin",
    "recipients": "mxgate.plugins.recipients:RecipientsPlugin",
}
# The essential core: defaults every hook chain falls back to (all ``trylast``). They cannot be disabled,
# but any plugin can override them by answering first.
ESSENTIAL_PLUGINS: dict[str, str] = {
    "core": "mxgate.core.defaults:CorePlugin",
}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    source: str  # "essential", "builtin", "entry point <dist>", "config: <spec>"
    priority: int
    enabled: bool
    hooks: tuple[str, ...]
    description: str = ""


@dataclass(slots=True)
class HookStats:
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0


class HookCallError(Exception):
    """Raised by the dispatcher (mode ``raise``) when an implementation failed; carries who and where."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin, self.hook, self.error = plugin, hook, error
        super().__init__(f"plugin {plugin!r} failed in {hook}: {error!r}")


@dataclass
class PluginSet:
    """The loaded plugins and their pluggy manager."""

    pm: pluggy.PluginManager
    infos: list[PluginInfo] = field(default_factory=list)

    def names(self) -> list[str]:
        return [i.name for i in self.infos if i.enabled]

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)


def _hook_names(obj: object) -> tuple[str, ...]:
    return tuple(sorted(n for n in dir(obj) if n.startswith("mxgate_") and callable(getattr(obj, n, None))))


def _plugin_name(obj: object, fallback: str) -> str:
    name = getattr(obj, "name", None) or getattr(obj, "PLUGIN_NAME", None)
    return str(name) if isinstance(name, str) and name else fallback


def _instantiate(obj: Any) -> Any:
    """A class is instantiated (no arguments); a module or an instance is used as is."""
    return obj() if inspect.isclass(obj) else obj


def load_object(spec: str, base_dir: Path) -> tuple[Any, str]:
    """``"package.module:object"``, ``"package.module"`` or ``"path/to/file.py[:object]"``."""
    target, _, attr = spec.partition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise PluginError(f"plugin file {str(path)!r} does not exist")
        mod_name = f"mxgate_local_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"cannot load plugin file {str(path)!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise PluginError(f"plugin file {str(path)!r} failed to import: {exc!r}") from exc
        default_name = path.stem
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise PluginError(f"plugin module {target!r} failed to import: {exc!r}") from exc
        default_name = target.rsplit(".", 1)[-1]
    if not attr:
        return module, default_name
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise PluginError(f"plugin {spec!r}: module has no attribute {attr!r}") from None
    return obj, attr


def build_plugins(
    *,
    load: Sequence[str] = (),
    disable: Iterable[str] = (),
    priority: Mapping[str, int] | None = None,
    base_dir: Path = Path("."),
    entry_points: bool = True,
    builtin: bool = True,
    extra: Sequence[tuple[str, Any]] = (),
) -> PluginSet:
    """Assemble the plugin set. Order of calls follows priority (1 first); equal priorities keep load order.
    ``builtin=False`` (with ``entry_points=False``): only the essential core (the command line without a
    usable configuration file)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = set(disable)
    priority = dict(priority or {})
    candidates: list[tuple[str, str, Any]] = []  # (name, source, object)
    tables = (("essential", ESSENTIAL_PLUGINS), ("builtin", BUILTIN_PLUGINS if builtin else {}))
    for source, table in tables:
        for name, spec in table.items():
            candidates.append((name, source, _instantiate(load_object(spec, base_dir)[0])))
    seen = {name for name, _, _ in candidates}
    if entry_points:
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if ep.name in seen:
                continue
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(f"entry point {ep.name!r} ({ep.value}) failed to load: {exc!r}") from exc
            dist = ep.dist.name if ep.dist else "?"
            candidates.append((_plugin_name(obj, ep.name), f"entry point {dist}", _instantiate(obj)))
            seen.add(ep.name)
    for spec in load:
        obj, default_name = load_object(spec, base_dir)
        instance = _instantiate(obj)
        name = _plugin_name(instance, default_name)
        if name in seen:
            raise PluginError(f"plugin {spec!r}: the name {name!r} is already taken by another plugin")
        candidates.append((name, f"config: {spec}", instance))
        seen.add(name)
    for name, obj in extra:
        candidates.append((name, "test", obj))

    unknown = disabled - {n for n, _, _ in candidates}
    if unknown:
        raise PluginError(f"[plugins] disable names unknown plugins: {', '.join(sorted(unknown))}")
    essential_off = disabled & set(ESSENTIAL_PLUGINS)
    if essential_off:
        raise PluginError(f"essential plugins cannot be disabled: {', '.join(sorted(essential_off))}")

    infos: list[PluginInfo] = []
    ordered: list[tuple[int, int, str, str, Any]] = []
    for index, (name, source, obj) in enumerate(candidates):
        prio = int(priority.get(name, getattr(obj, "priority", DEFAULT_PRIORITY)))
        if prio < 1:
            raise PluginError(f"plugin {name!r}: priority must be 1 or more, got {prio}")
        ordered.append((prio, index, name, source, obj))
    # pluggy calls the LAST registered implementation first: register lowest priority (largest number) first.
    for prio, _index, name, source, obj in sorted(ordered, key=lambda t: (-t[0], -t[1])):
        enabled = name not in disabled
        if enabled:
            _check_wrappers(name, obj)
            try:
                pm.register(obj, name=name)
            except (ValueError, pluggy.PluginValidationError) as exc:
                raise PluginError(f"plugin {name!r} does not fit the hook contract: {exc}") from exc
        doc = (inspect.getdoc(obj) or "").strip().splitlines()
        infos.append(PluginInfo(name, source, prio, enabled, _hook_names(obj), doc[0] if doc else ""))
    infos.sort(key=lambda i: (i.priority, i.name))
    try:
        pm.check_pending()  # an implementation of a hook nobody declared: a typo, or a plugin for another version
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}: not an mxgate hook (see hookspecs.py)") from exc
    return PluginSet(pm, infos)


def _check_wrappers(name: str, obj: Any) -> None:
    for attr in _hook_names(obj):
        opts = getattr(getattr(obj, attr), "mxgate_impl", None)
        if isinstance(opts, dict) and (opts.get("hookwrapper") or opts.get("wrapper")):
            raise PluginError(
                f"plugin {name!r}: {attr} is a wrapper; mxgate dispatches hooks asynchronously "
                "and does not support wrappers"
            )


@dataclass(frozen=True, slots=True)
class _Call:
    """One implementation of a hook as :meth:`Dispatcher.call` calls it."""

    impl: pluggy.HookImpl
    stats: HookStats
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    coroutine: bool


class Dispatcher:
    """Calls hook implementations in pluggy's order, awaiting coroutines; times and counts every call."""

    def __init__(self, plugins: PluginSet, *, trace: bool = False) -> None:
        self.plugins = plugins
        self.trace = trace
        self.stats: dict[tuple[str, str], HookStats] = {}
        # set in a receive worker: plugin errors go to the main process's report hooks (after the log line here)
        self.error_sink: Callable[[str, str, BaseException], None] | None = None
        self._firstresult: dict[str, bool] = {}
        self._plans: dict[str, tuple[tuple[pluggy.HookImpl, HookStats], ...]] = {}
        self._call_plans: dict[str, tuple[_Call, ...]] = {}
        for name in dir(hookspecs):
            if name.startswith("mxgate_"):
                spec = getattr(plugins.pm.hook, name).spec
                self._firstresult[name] = bool(spec and spec.opts.get("firstresult"))

    def impls(self, hook: str) -> list[pluggy.HookImpl]:
        # get_hookimpls() lists in registration order with trylast first and tryfirst last; calls go in reverse.
        return list(reversed(getattr(self.plugins.pm.hook, hook).get_hookimpls()))

    def _plan(self, hook: str) -> tuple[tuple[pluggy.HookImpl, HookStats], ...]:
        """The implementations of a hook in call order, each with its stats record (the plugin set is fixed once
        built, so this is worked out once per hook: it is on every SMTP command's path)."""
        plan = self._plans.get(hook)
        if plan is None:
            plan = self._plans[hook] = tuple(
                (impl, self.stats.setdefault((impl.plugin_name, hook), HookStats())) for impl in self.impls(hook)
            )
        return plan

    def _calls(self, hook: str) -> tuple[_Call, ...]:
        """:meth:`_plan` with what each call needs looked up once: the function, the argument names, whether it
        is a coroutine function (awaited without asking), the stats record."""
        calls = self._call_plans.get(hook)
        if calls is None:
            calls = self._call_plans[hook] = tuple(
                _Call(
                    impl,
                    stats,
                    impl.function,
                    tuple(impl.argnames),
                    inspect.iscoroutinefunction(impl.function),
                )
                for impl, stats in self._plan(hook)
            )
        return calls

    async def call(self, hook: str, *, raise_errors: bool = False, quiet: bool = False, **kwargs: Any) -> Any:
        """firstresult hooks: the first non-None result or None. Others: the list of non-None results.
        ``quiet``: an error is not logged here (the caller, which gets it raised, says it)."""
        first = self._firstresult[hook]
        calls = self._call_plans.get(hook)
        if calls is None:
            calls = self._calls(hook)
        if not calls:
            return None if first else []
        results: list[Any] = []
        perf_counter = time.perf_counter
        for c in calls:
            stats = c.stats
            started = perf_counter()
            stats.calls += 1
            try:
                result = c.function(**{a: kwargs[a] for a in c.argnames})
                if c.coroutine or inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                stats.errors += 1
                stats.seconds += perf_counter() - started
                await self.report_error(c.impl.plugin_name, hook, exc, logged=quiet and raise_errors)
                if raise_errors:
                    raise HookCallError(c.impl.plugin_name, hook, exc) from exc
                continue
            elapsed = perf_counter() - started
            stats.seconds += elapsed
            if self.trace:
                log.debug(
                    "hook call",
                    extra={
                        "hook": hook,
                        "plugin": c.impl.plugin_name,
                        "ms": round(elapsed * 1e3, 3),
                        "result": type(result).__name__,
                    },
                )
            if result is not None:
                if first:
                    return result
                results.append(result)
        return None if first else results

    def call_sync(self, hook: str, **kwargs: Any) -> list[Any]:
        """For the synchronous lifecycle hooks (register_config, register_commands); coroutines are refused."""
        results = []
        for impl in self.impls(hook):
            result = impl.function(**{a: kwargs[a] for a in impl.argnames})
            if inspect.isawaitable(result):
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook} must not be async")
            if result is not None:
                results.append(result)
        return results

    async def report_error(self, plugin: str, hook: str, exc: BaseException, *, logged: bool = False) -> None:
        """Log a hook implementation's error (unless ``logged`` elsewhere: a receive worker's), then tell the
        ``report_on_plugin_error`` hooks, or the main process when this is a receive worker."""
        if not logged:
            log.error("plugin error", exc_info=exc, extra={"plugin": plugin, "hook": hook})
        if hook == "mxgate_report_on_plugin_error":
            return
        if self.error_sink is not None:
            self.error_sink(plugin, hook, exc)
            return
        for impl in self.impls("mxgate_report_on_plugin_error"):
            try:
                result = impl.function(
                    **{a: v for a, v in {"plugin": plugin, "hook": hook, "error": exc}.items() if a in impl.argnames}
                )
                if inspect.isawaitable(result):
                    await result
            except Exception:  # an error reporter that fails is logged and ignored
                log.exception("plugin error reporter failed", extra={"plugin": impl.plugin_name})


def collect_registry(dispatcher: Dispatcher) -> ConfigRegistry:
    """Ask every enabled plugin for its configuration declarations."""
    registry = ConfigRegistry()
    for impl in dispatcher.impls("mxgate_lifecycle_register_config"):
        before = set(registry.sections) | {k for k in registry.connector_settings}
        impl.function(**{a: registry for a in impl.argnames})
        for name in set(registry.sections) - before:
            registry.owners[name] = impl.plugin_name
    return registry


def _view(headers: MessageHeaders | None) -> MessageHeaders:
    return headers if headers is not None else MessageHeaders()


class Hooks:
    """Typed facade: one method per hook, so every call site is checked (tox's ``Plugin`` class)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._call = dispatcher.call
        self._pending: set[asyncio.Task[None]] = set()
        # set in a receive worker: report events go to the main process instead of this process's report hooks
        self.event_sink: Callable[[str, float, dict[str, str]], None] | None = None

    # lifecycle
    async def on_startup(self, runtime: Runtime) -> None:
        await self._call("mxgate_lifecycle_on_startup", raise_errors=True, quiet=True, runtime=runtime)

    async def on_shutdown(self, runtime: Runtime) -> None:
        await self._call("mxgate_lifecycle_on_shutdown", runtime=runtime)

    async def on_preflight(self, runtime: Runtime, running: bool) -> list[str]:
        """Every plugin's preflight problems, in call order; a plugin that raises is a problem itself."""
        problems: list[str] = []
        for impl in self.dispatcher.impls("mxgate_lifecycle_on_preflight"):
            args = {"runtime": runtime, "running": running}
            try:
                result: Any = impl.function(**{a: args[a] for a in impl.argnames})
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                problems.append(f"plugin {impl.plugin_name}: its check failed: {exc!r}")
                continue
            problems.extend(str(p) for p in result or ())
        return problems

    # receive: errors propagate as HookCallError so the SMTP side answers 451 4.3.0
    async def on_connect(self, session: Session) -> Verdict | None:
        return _verdict(await self._call("mxgate_receive_on_connect", raise_errors=True, session=session))

    async def on_ehlo_command(self, session: Session, hostname: str) -> Verdict | None:
        return _verdict(
            await self._call("mxgate_receive_on_ehlo_command", raise_errors=True, session=session, hostname=hostname)
        )

    async def on_starttls(self, session: Session) -> None:
        await self._call("mxgate_receive_on_starttls", session=session)

    async def on_auth_command(self, session: Session, mechanism: str, username: str | None) -> Verdict | None:
        return _verdict(
            await self._call(
                "mxgate_receive_on_auth_command",
                raise_errors=True,
                session=session,
                mechanism=mechanism,
                username=username,
            )
        )

    async def resolve_credentials(self, session: Session, username: str, password: str) -> AuthResult | None:
        result: AuthResult | None = await self._call(
            "mxgate_receive_resolve_credentials",
            raise_errors=True,
            session=session,
            username=username,
            password=password,
        )
        return result

    async def on_mail_command(self, session: Session, envelope: Envelope, sender: Address) -> Verdict | None:
        return _verdict(
            await self._call(
                "mxgate_receive_on_mail_command",
                raise_errors=True,
                session=session,
                envelope=envelope,
                sender=sender,
            )
        )

    async def on_rcpt_command(self, session: Session, envelope: Envelope, rcpt: Address) -> Verdict | None:
        return _verdict(
            await self._call(
                "mxgate_receive_on_rcpt_command",
                raise_errors=True,
                session=session,
                envelope=envelope,
                rcpt=rcpt,
            )
        )

    async def on_end_of_headers(self, session: Session, envelope: Envelope, message: IncomingMessage) -> Verdict | None:
        return _verdict(
            await self._call(
                "mxgate_receive_on_end_of_headers",
                raise_errors=True,
                session=session,
                envelope=envelope,
                message=message,
            )
        )

    async def on_end_of_data(self, session: Session, envelope: Envelope, message: IncomingMessage) -> Verdict | None:
        return _verdict(
            await self._call(
                "mxgate_receive_on_end_of_data",
                raise_errors=True,
                session=session,
                envelope=envelope,
                message=message,
            )
        )

    async def on_disconnect(self, session: Session) -> None:
        await self._call("mxgate_receive_on_disconnect", session=session)

    # categorizer (``headers``: the message's header view; a callout's message has none)
    async def on_submitted_message(self, message: QueuedMessage, headers: MessageHeaders | None = None) -> None:
        await self._call("mxgate_categorizer_on_submitted_message", message=message, headers=_view(headers))

    async def resolve_recipient(
        self, message: QueuedMessage, recipient: Address, headers: MessageHeaders | None = None
    ) -> Sequence[Address] | None:
        result: Sequence[Address] | None = await self._call(
            "mxgate_categorizer_resolve_recipient", message=message, recipient=recipient, headers=_view(headers)
        )
        return result

    async def resolve_route(
        self, message: QueuedMessage, recipient: Address, headers: MessageHeaders | None = None
    ) -> Route | None:
        result: Route | None = await self._call(
            "mxgate_categorizer_resolve_route", message=message, recipient=recipient, headers=_view(headers)
        )
        return result

    async def on_routed_message(
        self, message: QueuedMessage, routes: Sequence[tuple[Address, Route]], headers: MessageHeaders | None = None
    ) -> None:
        await self._call("mxgate_categorizer_on_routed_message", message=message, routes=routes, headers=_view(headers))

    # delivery
    async def resolve_next_hop(self, destination: Destination) -> NextHop | None:
        result: NextHop | None = await self._call("mxgate_delivery_resolve_next_hop", destination=destination)
        return result

    async def resolve_tls_policy(self, destination: Destination, next_hop: NextHop) -> list[TlsPolicy]:
        result: list[TlsPolicy] = await self._call(
            "mxgate_delivery_resolve_tls_policy", destination=destination, next_hop=next_hop
        )
        return result

    async def on_tls_verify(
        self, attempt: AttemptContext, policy: TlsPolicy, chain: Sequence[x509.Certificate]
    ) -> PeerVerification | None:
        result: PeerVerification | None = await self._call(
            "mxgate_delivery_on_tls_verify", attempt=attempt, policy=policy, chain=chain
        )
        return result

    async def on_tls_outcome(self, outcome: TlsOutcome) -> None:
        await self._call("mxgate_delivery_on_tls_outcome", outcome=outcome)

    async def on_delivered(self, report: DeliveryReport) -> None:
        await self._call("mxgate_delivery_on_delivered", report=report)

    async def on_deferred(self, report: DeliveryReport) -> None:
        await self._call("mxgate_delivery_on_deferred", report=report)

    async def on_failed(self, report: DeliveryReport) -> None:
        await self._call("mxgate_delivery_on_failed", report=report)

    # reporting
    async def on_event(self, kind: str, value: float = 1.0, **labels: str) -> None:
        if self.event_sink is not None:
            self.event_sink(kind, value, labels)
            return
        event = ReportEvent(kind, tuple(sorted(labels.items())), value)
        await self._call("mxgate_report_on_event", event=event)

    def emit(self, kind: str, value: float = 1.0, **labels: str) -> None:
        """``on_event`` from synchronous code (callbacks such as the resolver's observer): scheduled on the
        running loop, with a reference kept until it ran."""
        task = asyncio.get_running_loop().create_task(self.on_event(kind, value, **labels))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _verdict(result: object) -> Verdict | None:
    if result is None or isinstance(result, VERDICT_TYPES):
        return result
    raise PluginError(
        f"a receive hook returned {type(result).__name__}; expected Accept, Reject, TempFail, Disconnect or None"
    )
