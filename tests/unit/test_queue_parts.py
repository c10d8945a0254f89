"""The queue's parts on their own: errors, schema, writer (group commit), queries, DSN helpers, the reporter."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mxgate.core.delivery import FAILED, RecipientOutcome
from mxgate.core.messages import QueuedMessage, QueuedRecipient, RecipientStatus
from mxgate.core.metadata import MessageMeta
from mxgate.core.model import DsnNotify, RecipientDsn
from mxgate.core.queue import queries
from mxgate.core.queue.dsn import recipient_dsn
from mxgate.core.queue.errors import QueueError, QueueFullError, map_error
from mxgate.core.queue.reporting import Reporter, _status_of
from mxgate.core.queue.retry import RetrySchedule
from mxgate.core.queue.schema import SCHEMA_VERSION, open_connections
from mxgate.core.queue.store import RecipientResult
from mxgate.core.queue.writer import Writer


def test_map_error_disk_full_other_and_foreign() -> None:
    full = map_error(sqlite3.OperationalError("database or disk is full"))
    assert isinstance(full, QueueFullError) and isinstance(full.__cause__, sqlite3.OperationalError)
    other = map_error(sqlite3.OperationalError("no such table: x"))
    assert type(other) is QueueError
    foreign = ValueError("x")
    assert map_error(foreign) is foreign


@pytest.fixture
def conns(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, sqlite3.Connection]]:
    writer, reader = open_connections(tmp_path / "q.sqlite3", None)
    yield writer, reader
    reader.close()
    writer.close()


def test_a_new_schema_is_current_empty_and_consistent(conns: tuple[sqlite3.Connection, sqlite3.Connection]) -> None:
    writer, reader = conns
    assert writer.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert reader.execute("PRAGMA query_only").fetchone()[0] == 1
    assert queries.stats_row(reader) == queries.recount(reader)
    assert queries.integrity_problems(reader) == []
    assert queries.page(reader, limit=10, include_finished=True, after=None) == []
    counts = queries.counts(reader, 0.0)
    assert counts.messages == 0 and counts.oldest_age is None
    assert counts.recipients_in(RecipientStatus.QUEUED) == 0


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    writer, reader = open_connections(path, None)
    writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    reader.close()
    writer.close()
    with pytest.raises(QueueError, match="newer"):
        open_connections(path, None)


def _insert(msg_id: str, sender: str, rcpt: str) -> Any:
    def job(conn: sqlite3.Connection) -> str:
        conn.execute(
            "INSERT INTO messages (id, sender, received_at, size) VALUES (?, ?, ?, ?)", (msg_id, sender, 1.0, 3)
        )
        conn.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (msg_id, b"abc"))
        conn.execute(
            "INSERT INTO recipients (msg_id, idx, address, status, next_attempt) VALUES (?, 0, ?, 'queued', 1.0)",
            (msg_id, rcpt),
        )
        return msg_id

    return job


def _failing(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO messages (id, sender, received_at, size) VALUES ('A', 'x', 0, 0)")  # a duplicate id


async def test_the_writer_commits_a_batch_and_fails_only_the_failing_job(
    conns: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    writer_conn, reader = conns
    writer = Writer(writer_conn)
    try:
        results = await asyncio.gather(
            writer.submit(_insert("A", "a@example.org", "x@example.net")),
            writer.submit(_failing),
            writer.submit(_insert("B", "", "y@example.net"), durable=False),
            return_exceptions=True,
        )
    finally:
        await asyncio.to_thread(writer.stop)
    assert results[0] == "A" and results[2] == "B"
    assert isinstance(results[1], QueueError)
    assert writer.failed_jobs == 1 and writer.jobs == 2 and writer.commits >= 1
    assert [m.id for m in queries.page(reader, limit=10, include_finished=False, after=None)] == ["A", "B"]
    assert queries.page(reader, limit=10, include_finished=False, after="A")[0].id == "B"
    none = dict(recipient=None, received_before=None, include_finished=False, limit=None, after=None)
    assert queries.select(reader, sender="", **none) == ["B"]  # type: ignore[arg-type]
    assert queries.body(reader, "A") == b"abc"
    assert queries.counts(reader, 2.0).recipients_in(RecipientStatus.QUEUED) == 2
    assert queries.stats_row(reader) == queries.recount(reader)
    assert queries.integrity_problems(reader) == []


def test_recipient_dsn_from_the_queue_text() -> None:
    def rcpt(notify: str | None, orcpt: str | None) -> QueuedRecipient:
        return QueuedRecipient("x@example.net", RecipientStatus.QUEUED, 0, None, None, 0.0, notify, orcpt)

    assert recipient_dsn(None) == RecipientDsn()
    got = recipient_dsn(rcpt("success, Delay", "RFC822;X@Example.net"))
    assert got.notify == frozenset({DsnNotify.SUCCESS, DsnNotify.DELAY})
    assert got.orcpt == ("rfc822", "X@Example.net")
    assert recipient_dsn(rcpt(None, "plain@example.net")).orcpt == ("rfc822", "plain@example.net")


def test_status_of_a_reply() -> None:
    assert _status_of("550 5.1.1 no such user") == "5.1.1"
    assert _status_of("451 try later") == "4.0.0"
    assert _status_of("") == "4.0.0"


class _Runtime:
    """What a Reporter uses of the runtime."""

    def __init__(self, headers: bytes) -> None:
        self.submitted: list[tuple[Any, ...]] = []
        self.tracked: list[tuple[Any, dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.config = SimpleNamespace(server=SimpleNamespace(hostname="mx.example.org"))
        self.tracking = SimpleNamespace(write=lambda event, **kw: self.tracked.append((event, kw)))

        async def on_event(name: str, **kw: Any) -> None:
            self.events.append((name, kw))

        async def stored_headers(msg_id: str) -> bytes:
            return headers

        self.hooks = SimpleNamespace(on_event=on_event)
        self.queue = SimpleNamespace(headers=stored_headers)

    async def submit(self, sender: str, rcpts: list[str], data: bytes, **kw: Any) -> str:
        self.submitted.append((sender, rcpts, data, kw))
        return "DSN1"


def _message(status: RecipientStatus, last_error: str | None = None) -> QueuedMessage:
    rcpt = QueuedRecipient("bob@example.net", status, 1, last_error, "out", 0.0)
    return QueuedMessage(
        id="Q1",
        sender="alice@example.org",
        recipients=(rcpt,),
        received_at=0.0,
        size=10,
        message_id="<q1@example.org>",
        held=False,
    )


async def test_the_reporter_queues_a_failure_dsn_to_the_sender_with_the_null_sender() -> None:
    runtime = _Runtime(b"Subject: hi\r\nFrom: alice@example.org\r\n\r\n")
    woken: list[bool] = []
    reporter = Reporter(runtime, lambda: woken.append(True))  # type: ignore[arg-type]
    msg = _message(RecipientStatus.FAILED, "550 5.1.1 no such user")
    results = [RecipientResult("bob@example.net", RecipientStatus.FAILED, "550 5.1.1 no such user", None)]
    outcome = RecipientOutcome("bob@example.net", FAILED, "550 5.1.1 no such user", "5.1.1")
    await reporter.dsn(msg, results, {"bob@example.net": outcome}, 100.0)
    [(sender, rcpts, report, kw)] = runtime.submitted
    assert sender == "" and rcpts == ["alice@example.org"] and kw["meta"] == MessageMeta(dsn_for="Q1")
    assert b"5.1.1" in report
    assert woken == [True]
    assert runtime.events == [("queue", {"action": "dsn", "dsn": "failed"})]


async def test_the_reporter_sends_no_delay_warning_before_it_is_due() -> None:
    runtime = _Runtime(b"Subject: hi\r\n\r\n")
    reporter = Reporter(runtime, lambda: None)  # type: ignore[arg-type]
    msg = _message(RecipientStatus.DEFERRED, "451 4.4.1 later")
    schedule = RetrySchedule(delay_warning_after=3600.0)
    await reporter.delay_warning(msg, [(schedule, ["bob@example.net"])], None, 60.0)
    assert runtime.submitted == []
    await reporter.delay_warning(msg, [(schedule, ["bob@example.net"])], None, 4000.0)
    [(sender, _, report, _)] = runtime.submitted
    assert sender == "" and b"delayed" in report.lower()
