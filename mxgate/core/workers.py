"""Receive workers (``server.receive_workers = N``): N processes that accept on the listening sockets the main
process bound and run only the receive stage, so that receiving uses other cores while the main process queues
and delivers. One process runs Python under one lock (the GIL); bench/RESULTS.md shows that lock, not the disk or
the network, is what bounds a single process's acceptance rate. The main process itself does not accept while it
has workers (when it did, the kernel gave it most connections and its loop, which also delivers, was the
bottleneck while the worker used a third of a core); while a dead worker is restarted, clients wait in the listen
backlog.

A worker is ``python -m mxgate.core.workers``, started by the main process once its listeners are bound. It reads
one JSON document on stdin: the configuration :class:`~mxgate.core.bootstrap.Source` (the main process's text, so
every process runs the same configuration), its slot, and the numbers of the file descriptors it inherited (the
listening sockets by listener, and its end of a socketpair: the channel). In a worker:

- ``runtime.role`` is :data:`~mxgate.core.runtime.ROLE_RECEIVER`; plugins' ``on_startup`` runs there too and
  starts no background service that belongs to the main process (metrics endpoint, refreshers, report senders);
- a message is queued by the main process: the worker sends it over its channel, the main process puts it
  durably (its one queue writer group-commits every process's messages, and hands the message to delivery from
  memory) and sends back the queue id; only then does the worker answer 250. SQLite takes one writer at a time,
  and writers in several processes wait for each other with sleeps (measured: p99 acceptance went from 39 ms to
  143 ms), so the workers do not open the queue at all (``runtime.queue`` is None there; ``runtime.submit`` works);
- the channel carries frames (:data:`FRAME`: a length, a kind byte, the payload), written in batches (one write
  for what is pending: messages at the end of the loop iteration they were submitted in, reports within
  :data:`REPORT_DELAY`, answers at the end of the main process's loop iteration). Worker to main: ``P`` a message
  to queue (a JSON head, then the message bytes), ``J`` a JSON list of reports: ``{"e": kind, "v": value, "l":
  labels}`` for every report event and ``{"x": [plugin, hook, error]}`` for every plugin error (the main
  process's report hooks receive them as their own, so metrics describe one gateway), ``{"s": [...]}`` hook
  timing deltas every second, ``{"ready": pid}`` once it serves. Main to worker:
  ``A`` the answer to a ``P``: ``{"r": request, "q": queue id}`` or ``{"r": request, "e": "full" | "error"}``;
- SIGTERM drains it like the main process (clients waiting for a command get 421, transactions finish); so does
  the channel closing, which means the main process is gone. :data:`RETIRE_SIGNAL` (a reload replaced it) stops its
  accepting and lets every open session end by itself before it exits. SIGINT is left to the main process.

The main process supervises them (:class:`ReceiveWorkers`): a worker that exits while the gateway runs is logged,
its open sessions are closed in the metrics, and it is started again (after 1 s, doubling up to 30 s while it
keeps dying within 10 s of its start). On stop, workers get SIGTERM and are waited for, then SIGKILLed.

What stays per process: the AUTH failure limiter (``auth_max_failures`` counts in each process) and the DNS cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Final

from mxgate.core import bootstrap, logs
from mxgate.core.bootstrap import Source
from mxgate.core.errors import MxgateError, WorkerError
from mxgate.core.messages import MessageOptions, NewRecipient
from mxgate.core.metadata import MessageMeta, MetaInput
from mxgate.core.plugins import HookCallError, HookStats
from mxgate.core.queue.errors import QueueFullError
from mxgate.core.runtime import RECEIVE_WORKER_PIDS, ROLE_RECEIVER, Runtime
from mxgate.core.smtp.server import Listener, start_listeners

log = logging.getLogger(__name__)

STATS_INTERVAL: Final = 1.0  # how often a worker sends its hook timing deltas
RESTART_DELAY: Final = 1.0  # first delay before a dead worker is started again
RESTART_DELAY_MAX: Final = 30.0
STABLE_AFTER: Final = 10.0  # a worker that ran this long before dying is restarted after the first delay again
READY_TIMEOUT: Final = 60.0  # a worker that does not report ready in this time is killed and restarted
CHANNEL_LIMIT: Final = 1 << 20
# A worker's reports (metric events, plugin errors) are sent together, at most this long after they happened.
REPORT_DELAY: Final = 0.02
DRAIN_TIMEOUT: Final = 30.0  # a stopping worker waits this long for its transactions in progress
# Sent by the main process to a worker a reload replaced (a new one already serves): accept no more and exit when
# the open sessions are over. SIGTERM still stops it at once (clients waiting for a command get 421).
RETIRE_SIGNAL: Final = signal.SIGUSR2


class WorkerPluginError(Exception):
    """A plugin error that happened in a receive worker, as the main process's report hooks see it."""


# Every frame on a channel: payload length (4 bytes, big-endian; the kind byte not included), kind (1 byte).
FRAME: Final = struct.Struct("!Ic")
HEAD: Final = struct.Struct("!I")  # a P frame's payload starts with the length of its JSON head


_dumps = json.JSONEncoder(separators=(",", ":")).encode  # a head or an answer: compact, one encoder reused


def _frame(kind: bytes, *parts: bytes) -> list[bytes]:
    return [FRAME.pack(sum(len(p) for p in parts), kind), *parts]


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next frame, or None at a clean end of the channel."""
    try:
        head = await reader.readexactly(FRAME.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("channel closed inside a frame") from None
        return None
    length, kind = FRAME.unpack(head)
    return kind, await reader.readexactly(length)


# -- in the worker -----------------------------------------------------------------------------------------------


class _Channel:
    """The worker's end: messages to queue (answered by the main process) and reports.

    What it sends is written in batches, one write for several frames: a message to queue at the end of the loop
    iteration it was submitted in (with the others submitted in that iteration), reports at the latest
    :data:`REPORT_DELAY` after they happened (with any message sent earlier). Reports are encoded before a message
    that follows them, so the main process sees them in the order they happened."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._reports: list[dict[str, Any]] = []
        self._out: list[bytes] = []  # frames encoded, not yet written
        self._flush_at: asyncio.TimerHandle | asyncio.Handle | None = None
        self._flush_soon = False  # the flush scheduled is at the end of this loop iteration
        self._answers: dict[int, asyncio.Future[str]] = {}
        self._requests = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()

    def report(self, item: dict[str, Any]) -> None:
        self._reports.append(item)
        if self._flush_at is None:
            self._flush_at = self._loop.call_later(REPORT_DELAY, self.flush)

    def _encode_reports(self) -> None:
        if self._reports:
            reports, self._reports = self._reports, []
            self._out += _frame(b"J", json.dumps(reports, separators=(",", ":")).encode())

    def flush(self) -> None:
        """Write every frame pending (reports included) now."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        self._flush_soon = False
        self._encode_reports()
        out, self._out = self._out, []
        if out and not self.writer.is_closing():
            self.writer.writelines(out)

    def event(self, kind: str, value: float, labels: dict[str, str]) -> None:
        self.report({"e": kind, "v": value, "l": labels})

    def plugin_error(self, plugin: str, hook: str, exc: BaseException) -> None:
        self.report({"x": [plugin, hook, f"{type(exc).__name__}: {exc}"]})

    async def submit(
        self,
        sender: str,
        recipients: Sequence[str | NewRecipient],
        data: bytes,
        *,
        meta: MetaInput = None,
        message_id: str | None = None,
        now: float,
        options: MessageOptions | None = None,
    ) -> str:
        """``runtime.enqueue`` of a worker: the main process queues the message; returns its queue id once it is
        on disk there. If the main process is gone before it answered, the message may or may not be queued:
        the client gets a temporary failure and sends again (a possible duplicate, never a loss)."""
        if self.closed.is_set():
            raise ConnectionError("the main process is gone")
        request = next(self._requests)
        head = _dumps(
            {
                "r": request,
                "f": sender,
                "t": [r if isinstance(r, str) else [r.address, r.dsn_notify, r.orcpt] for r in recipients],
                "m": MessageMeta.of(meta).to_pairs(),
                "i": message_id,
                "n": now,
                "o": options.to_json() if options is not None else None,
            }
        ).encode()
        answer: asyncio.Future[str] = self._loop.create_future()
        self._answers[request] = answer
        self._encode_reports()  # reports first: they happened before
        self._out += _frame(b"P", HEAD.pack(len(head)), head, data)
        if not self._flush_soon:  # written at the end of this loop iteration, with what else is submitted in it
            if self._flush_at is not None:
                self._flush_at.cancel()
            self._flush_at = self._loop.call_soon(self.flush)
            self._flush_soon = True
        try:
            return await answer
        finally:
            self._answers.pop(request, None)

    async def read_answers(self) -> None:
        """Until the main process closes the channel (it stopped or died): then every waiting put fails."""
        try:
            while (frame := await _read_frame(self.reader)) is not None:
                kind, payload = frame
                if kind != b"A":
                    continue
                item = json.loads(payload)
                answer = self._answers.get(item["r"])
                if answer is None or answer.done():
                    continue
                if "q" in item:
                    answer.set_result(item["q"])
                elif item.get("e") == "full":
                    answer.set_exception(QueueFullError(item.get("d", "queue full")))
                else:
                    answer.set_exception(RuntimeError(f"the main process could not queue it: {item.get('d')}"))
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for answer in self._answers.values():
                if not answer.done():
                    answer.set_exception(ConnectionError("the main process is gone"))


class _StatsDeltas:
    """Hook figures (calls, errors, seconds) accumulated since the last report."""

    def __init__(self, stats: dict[tuple[str, str], HookStats]) -> None:
        self.stats = stats
        self.sent: dict[tuple[str, str], tuple[int, int, float]] = {}

    def take(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        for key, st in list(self.stats.items()):
            calls, errors, seconds = self.sent.get(key, (0, 0, 0.0))
            if st.calls != calls or st.errors != errors:
                out.append([*key, st.calls - calls, st.errors - errors, st.seconds - seconds])
                self.sent[key] = (st.calls, st.errors, st.seconds)
        return out


async def serve_worker(spec: dict[str, Any]) -> None:
    """A receive worker's life: start, serve until SIGTERM or the main process is gone, drain, stop."""
    source = Source(**spec["source"])
    config, plugins = bootstrap.load_source(source)
    bootstrap.check_state_dir(config.state_path)
    runtime = Runtime.create(config, plugins, role=ROLE_RECEIVER)
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=spec["channel"]), limit=CHANNEL_LIMIT)
    channel = _Channel(reader, writer)
    runtime.hooks.event_sink = channel.event
    runtime.hooks.dispatcher.error_sink = channel.plugin_error
    runtime.enqueue = channel.submit
    await bootstrap.open_services(runtime, queue=False)
    stop = asyncio.Event()
    retire = asyncio.Event()  # replaced by a reload: accept nothing more, let open sessions end, then exit
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(RETIRE_SIGNAL, retire.set)
    sockets = {name: [socket.socket(fileno=fd) for fd in fds] for name, fds in dict(spec["listeners"]).items()}
    deltas = _StatsDeltas(runtime.hooks.dispatcher.stats)
    answers = asyncio.ensure_future(channel.read_answers())
    listeners: list[Listener] = []
    try:
        await runtime.hooks.on_startup(runtime)
        listeners = await start_listeners(runtime, sockets)
        channel.report({"ready": os.getpid()})
        stats_task = asyncio.ensure_future(_send_stats(channel, deltas))
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(channel.closed.wait())]
        retiring = asyncio.ensure_future(_retire(retire, listeners))
        await asyncio.wait([*waiters, retiring], return_when=asyncio.FIRST_COMPLETED)
        retiring.cancel()
        stats_task.cancel()
        for waiter in waiters:
            waiter.cancel()
    finally:
        for listener in listeners:
            listener.close()
        for listener in listeners:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.wait_closed(), DRAIN_TIMEOUT)
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await runtime.hooks.on_shutdown(runtime)
        if runtime.cluster is not None:
            await runtime.cluster.close()
        runtime.tracking.close()
        final = deltas.take()
        if final:
            channel.report({"s": final})
        channel.flush()
        answers.cancel()
        with contextlib.suppress(Exception):
            await writer.drain()
            writer.close()


async def _retire(retire: asyncio.Event, listeners: Sequence[Listener]) -> None:
    """After :data:`RETIRE_SIGNAL`: stop accepting (the other processes keep the sockets open) and return once
    every open session has ended by itself — QUIT, or its idle or session timeout. No session is cut short."""
    await retire.wait()
    for listener in listeners:
        listener.stop_accepting()
    while any(listener.connections for listener in listeners):
        await asyncio.sleep(0.1)


async def _send_stats(channel: _Channel, deltas: _StatsDeltas) -> None:
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        changed = deltas.take()
        if changed:
            channel.report({"s": changed})


def worker_main() -> int:
    """``python -m mxgate.core.workers``: the spec on stdin (see the module docs)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the main process's: it replaces us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the main process, which stops us
    spec = json.loads(sys.stdin.read())
    server = spec.get("log", {})
    logs.configure(server.get("format", "logfmt"), server.get("level", "info"))
    slot = spec.get("slot", 0)

    def tag(record: logging.LogRecord) -> bool:
        record.receive_worker = slot  # which process wrote the line
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    try:
        bootstrap.run_loop(serve_worker(spec))
    except (MxgateError, HookCallError) as exc:  # logged where it happened; one line to say this process ends
        print(f"mxgate receive worker {slot}: {exc}", file=sys.stderr)
        return 1
    return 0


# -- in the main process --------------------------------------------------------------------------------------


class _Worker:
    """One running worker as the main process sees it."""

    def __init__(
        self,
        slot: int,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.slot = slot
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.started = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.sessions: Counter[str] = Counter()  # open sessions per listener, to close in the metrics if it dies
        self.task: asyncio.Task[None] | None = None  # reads its channel
        self._answers: list[bytes] = []  # answer frames not yet written

    def answer(self, frame: list[bytes]) -> None:
        """Send an answer at the end of this loop iteration, in one write with the others given in it (the queue
        writer's group commit finishes several messages at once)."""
        if not self._answers:
            asyncio.get_running_loop().call_soon(self.flush_answers)
        self._answers += frame

    def flush_answers(self) -> None:
        answers, self._answers = self._answers, []
        if answers and not self.writer.is_closing():
            self.writer.writelines(answers)


class ReceiveWorkers:
    """The main process's side: starts ``count`` workers on ``listeners``' sockets and keeps them running."""

    def __init__(self, runtime: Runtime, source: Source, listeners: Sequence[Listener], count: int) -> None:
        self.runtime = runtime
        self.source = source
        self.listeners = listeners
        self.count = count
        self.workers: dict[int, _Worker] = {}
        self.pids: dict[int, int] = {}  # slot -> pid, while it runs
        runtime.stash[RECEIVE_WORKER_PIDS] = self.pids
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[_Worker] = set()  # replaced by a reload, still draining their sessions

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def start(self) -> None:
        """Start every worker and wait until each serves (or failed to start: a start-up error)."""
        for slot in range(self.count):
            worker = await self._spawn(slot)
            try:
                await asyncio.wait_for(asyncio.shield(worker.ready), READY_TIMEOUT)
            except Exception as exc:
                await self.stop(5.0)
                raise WorkerError(f"receive worker {slot} did not start: {exc}") from exc
            self._tasks.append(asyncio.ensure_future(self._supervise(worker)))

    async def _spawn(self, slot: int) -> _Worker:
        ours, theirs = socket.socketpair()
        fds = {lst.config.name: [s.fileno() for s in lst.sockets] for lst in self.listeners}
        server = self.runtime.config.server
        spec = {
            "source": asdict(self.source),
            "slot": slot,
            "channel": theirs.fileno(),
            "listeners": fds,
            "log": {"format": server.log_format, "level": server.log_level},
        }
        passed = [theirs.fileno(), *(fd for v in fds.values() for fd in v)]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mxgate.core.workers", stdin=asyncio.subprocess.PIPE, pass_fds=passed
            )
        finally:
            theirs.close()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=CHANNEL_LIMIT)
        worker = _Worker(slot, proc, reader, writer)
        self.workers[slot] = worker
        self.pids[slot] = proc.pid
        worker.task = asyncio.ensure_future(self._read(worker))
        log.info("receive worker started", extra={"slot": slot, "pid": proc.pid})
        return worker

    async def _read(self, worker: _Worker) -> None:
        """Queue what the worker sends and replay what it reports, until its channel closes."""
        hooks = self.runtime.hooks
        puts: set[asyncio.Task[None]] = set()
        try:
            while (frame := await _read_frame(worker.reader)) is not None:
                kind, payload = frame
                if kind == b"P":
                    task = asyncio.ensure_future(self._put(worker, payload))
                    puts.add(task)
                    task.add_done_callback(puts.discard)
                elif kind == b"J":
                    for item in json.loads(payload):
                        await self._report(worker, item)
        except (ValueError, KeyError, TypeError):
            log.exception("receive worker: unreadable frame; closing its channel", extra={"slot": worker.slot})
        except (ConnectionError, OSError):
            pass
        finally:
            if puts:  # what it sent is queued (and answered, if it still listens) before it is counted gone
                await asyncio.gather(*puts, return_exceptions=True)
            worker.flush_answers()
            worker.writer.close()
            for listener, n in worker.sessions.items():
                for _ in range(n):  # sessions it had open when it died
                    await hooks.on_event("disconnection", listener=listener)
            worker.sessions.clear()
            if not worker.ready.done():
                worker.ready.set_exception(RuntimeError(f"exited with {await worker.proc.wait()}"))

    async def _put(self, worker: _Worker, payload: bytes) -> None:
        (size,) = HEAD.unpack_from(payload)
        head = json.loads(payload[HEAD.size : HEAD.size + size])
        data = payload[HEAD.size + size :]
        answer: dict[str, Any] = {"r": head["r"]}
        try:
            recipients = [r if isinstance(r, str) else NewRecipient(*r) for r in head["t"]]
            answer["q"] = await self.runtime.submit(
                head["f"],
                recipients,
                data,
                meta=MessageMeta.from_pairs(tuple(m) for m in head["m"]),
                message_id=head["i"],
                now=head["n"],
                options=MessageOptions.from_json(head["o"]) if head.get("o") else None,
            )
        except QueueFullError as exc:
            answer.update(e="full", d=str(exc))
        except Exception as exc:
            log.exception("queueing a receive worker's message failed", extra={"slot": worker.slot})
            answer.update(e="error", d=f"{type(exc).__name__}: {exc}")
        worker.answer(_frame(b"A", _dumps(answer).encode()))

    async def _report(self, worker: _Worker, item: dict[str, Any]) -> None:
        hooks = self.runtime.hooks
        if "e" in item:
            kind, labels = item["e"], item["l"]
            if kind == "connection":
                worker.sessions[labels.get("listener", "")] += 1
            elif kind == "disconnection":
                worker.sessions[labels.get("listener", "")] -= 1
            await hooks.on_event(kind, item["v"], **labels)
        elif "x" in item:
            plugin, hook, text = item["x"]
            await hooks.dispatcher.report_error(plugin, hook, WorkerPluginError(text), logged=True)
        elif "s" in item:
            for plugin, hook, calls, errors, seconds in item["s"]:
                st = hooks.dispatcher.stats.setdefault((plugin, hook), HookStats())
                st.calls += calls
                st.errors += errors
                st.seconds += seconds
        elif "ready" in item and not worker.ready.done():
            worker.ready.set_result(None)

    async def _supervise(self, worker: _Worker) -> None:
        delay = RESTART_DELAY
        while True:
            code = await worker.proc.wait()
            if self.pids.get(worker.slot) == worker.proc.pid:
                del self.pids[worker.slot]
            if worker.task is not None:
                await worker.task
            if self._stopping or self.workers.get(worker.slot) is not worker:  # stopped, or replaced by a reload
                self._retiring.discard(worker)
                return
            lived = time.monotonic() - worker.started
            delay = RESTART_DELAY if lived >= STABLE_AFTER else min(delay * 2, RESTART_DELAY_MAX)
            log.warning(
                "receive worker exited; starting it again",
                extra={"slot": worker.slot, "pid": worker.proc.pid, "returncode": code, "delay": delay},
            )
            await self.runtime.hooks.on_event("receive_worker_restart")
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                worker = await self._spawn(worker.slot)
                await asyncio.wait_for(asyncio.shield(worker.ready), READY_TIMEOUT)
            except Exception:
                log.exception("receive worker failed to start", extra={"slot": worker.slot})
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()

    async def reload(self, source: Source) -> None:
        """Replace every worker by one running ``source``, one slot at a time: the new worker serves before the
        old one is retired (:data:`RETIRE_SIGNAL`: it accepts no more and exits once its open sessions ended by
        themselves), so the listening sockets always have someone accepting and no session is cut short.
        A new worker that does not start is logged; the old one then keeps serving (with the old
        configuration) and the next reload tries again."""
        self.source = source
        for slot, old in sorted(self.workers.items()):
            if self._stopping:
                return
            new: _Worker | None = None
            try:
                new = await self._spawn(slot)
                await asyncio.wait_for(asyncio.shield(new.ready), READY_TIMEOUT)
            except Exception:
                log.exception(
                    "reload: a new receive worker failed to start; the old one keeps serving", extra={"slot": slot}
                )
                if new is not None:
                    with contextlib.suppress(ProcessLookupError):
                        new.proc.kill()
                self.workers[slot] = old
                self.pids[slot] = old.proc.pid
                continue
            self._tasks.append(asyncio.ensure_future(self._supervise(new)))
            self._retiring.add(old)
            if old.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    old.proc.send_signal(RETIRE_SIGNAL)
            log.info("receive worker replaced", extra={"slot": slot, "old_pid": old.proc.pid, "pid": new.proc.pid})

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to every worker (they drain their sessions), wait up to ``timeout``, then SIGKILL."""
        self._stopping = True
        workers = [*self.workers.values(), *self._retiring]
        for w in workers:
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(w.proc.wait()) for w in workers]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                for w in workers:
                    if w.proc.returncode is None:
                        log.warning("receive worker did not stop in time; killing it", extra={"pid": w.proc.pid})
                        with contextlib.suppress(ProcessLookupError):
                            w.proc.kill()
                await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(w.task for w in workers if w.task is not None), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pids.clear()


if __name__ == "__main__":
    sys.exit(worker_main())
