"""The durable queue store: round trips, group commit, per-recipient state, leases, admin, disk full."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mxgate.core.messages import NewRecipient, RecipientStatus
from mxgate.core.metadata import MessageMeta
from mxgate.core.queue import MessageNotFoundError, QueueError, QueueFullError, QueueStore, RecipientResult
from mxgate.core.queue.schema import SCHEMA_VERSION
from mxgate.core.queue.store import DB_NAME

NOW = 1_700_000_000.0
BODY = b"From: a@example.org\r\nSubject: test\r\nMessage-ID: <m1@example.org>\r\n\r\nHello\r\n"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = await QueueStore.open(tmp_path)
    yield s
    await s.close()


def body_of(n: int, size: int = 10 * 1024) -> bytes:
    head = f"Subject: message {n}\r\n\r\n".encode()
    fill = (f"{n:08d}".encode() * (size // 8 + 1))[: size - len(head)]
    return head + fill


# -- round trip --


async def test_put_get_body_round_trip(store: QueueStore) -> None:
    msg_id = await store.put(
        "a@example.org",
        [
            "b@example.net",
            NewRecipient("c@example.net", dsn_notify="FAILURE,DELAY", orcpt="rfc822;C@example.net"),
        ],
        BODY,
        meta=MessageMeta(client_ip="192.0.2.1", inbound_connector="internet", extra={"agent.tag": "x"}),
        message_id="<m1@example.org>",
        now=NOW,
    )
    msg = await store.get(msg_id)
    assert msg is not None
    assert msg.id == msg_id
    assert msg.sender == "a@example.org"
    assert [r.address for r in msg.recipients] == ["b@example.net", "c@example.net"]
    assert all(r.status is RecipientStatus.QUEUED and r.attempts == 0 for r in msg.recipients)
    assert all(r.next_attempt == NOW and r.route is None and r.last_error is None for r in msg.recipients)
    assert msg.recipients[0].dsn_notify is None
    assert msg.recipients[1].dsn_notify == "FAILURE,DELAY"
    assert msg.recipients[1].orcpt == "rfc822;C@example.net"
    assert msg.received_at == NOW
    assert msg.size == len(BODY)
    assert msg.message_id == "<m1@example.org>"
    assert msg.held is False
    assert msg.meta == MessageMeta(client_ip="192.0.2.1", inbound_connector="internet", extra={"agent.tag": "x"})
    assert msg.meta.inbound_connector == "internet" and msg.meta.extra["agent.tag"] == "x"
    assert msg.next_attempt == NOW
    assert msg.is_final is False
    assert msg.finished_at is None
    assert await store.body(msg_id) == BODY
    assert await store.headers(msg_id) == BODY[: BODY.index(b"\r\n\r\n") + 2]
    assert await store.get("NOSUCHID") is None
    with pytest.raises(MessageNotFoundError):
        await store.body("NOSUCHID")


async def test_null_sender_duplicates_and_no_recipients(store: QueueStore) -> None:
    msg_id = await store.put("", ["x@example.net", "x@example.net", "y@example.net"], b"x", now=NOW)
    msg = await store.get(msg_id)
    assert msg is not None
    assert msg.sender == ""
    assert [r.address for r in msg.recipients] == ["x@example.net", "y@example.net"]
    with pytest.raises(ValueError):
        await store.put("a@example.org", [], b"x", now=NOW)


async def test_ids_are_short_unique_and_sortable(store: QueueStore) -> None:
    ids = [await store.put("a@x.test", ["b@y.test"], b"x", now=NOW + i * 0.0001) for i in range(50)]
    ids += [await store.put("a@x.test", ["b@y.test"], b"x", now=NOW + 10 + i) for i in range(5)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 16 and i.isalnum() and i.isupper() for i in ids)
    assert [m.id for m in await store.list()] == ids


async def test_group_commit_500_concurrent_puts(tmp_path: Path) -> None:
    store = await QueueStore.open(tmp_path)
    try:
        before = store.stats
        bodies = {n: body_of(n) for n in range(500)}
        ids = await asyncio.gather(*(store.put("a@x.test", [f"r{n}@y.test"], bodies[n], now=NOW) for n in bodies))
        after = store.stats
    finally:
        await store.close()
    commits = after.commits - before.commits
    assert after.puts - before.puts == 500
    assert 1 <= commits <= 100, f"{commits} commits for 500 puts: no group commit"
    assert after.largest_batch > 1
    assert len(set(ids)) == 500
    reopened = await QueueStore.open(tmp_path)
    try:
        for n, msg_id in zip(bodies, ids, strict=True):
            assert await reopened.body(msg_id) == bodies[n]
        assert len(await reopened.list()) == 500
        assert await reopened.integrity_check() == []
    finally:
        await reopened.close()


async def test_a_failing_job_does_not_spoil_its_batch(store: QueueStore) -> None:
    """A bad request in the same commit as good puts fails alone; the puts are committed."""
    good = [store.put("a@x.test", ["b@y.test"], body_of(n), now=NOW) for n in range(20)]
    bad = store.record_results("NOSUCHID", [("b@y.test", RecipientStatus.DELIVERED, "250 ok", None)], now=NOW)
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(results[-1], MessageNotFoundError)
    ids = results[:-1]
    assert all(isinstance(i, str) for i in ids)
    assert len(await store.list()) == 20
    assert store.stats.failed_jobs == 1


async def test_a_cancelled_put_leaves_the_writer_working(store: QueueStore) -> None:
    task = asyncio.create_task(store.put("a@x.test", ["b@y.test"], body_of(1), now=NOW))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    msg_id = await store.put("a@x.test", ["b@y.test"], body_of(2), now=NOW)
    assert await store.body(msg_id) == body_of(2)
    assert 1 <= len(await store.list()) <= 2  # the cancelled one may have committed: a duplicate, never a loss
    assert await store.integrity_check() == []


# -- per-recipient state --


async def test_per_recipient_results_and_finish(store: QueueStore) -> None:
    rcpts = ["ok@y.test", "later@y.test", "bad@y.test"]
    msg_id = await store.put("a@x.test", rcpts, BODY, now=NOW)
    [leased] = await store.lease_due(NOW, 10, 60)
    assert leased.id == msg_id
    msg = await store.record_results(
        msg_id,
        [
            RecipientResult("ok@y.test", RecipientStatus.DELIVERED, "250 2.0.0 ok", None),
            ("later@y.test", RecipientStatus.DEFERRED, "451 4.3.0 try later", NOW + 300),
            ("bad@y.test", RecipientStatus.FAILED, "550 5.1.1 no such user", None),
        ],
        now=NOW + 1,
        mx="mx1.y.test",
        detail="tls=TLSv1.3",
    )
    by = {r.address: r for r in msg.recipients}
    assert by["ok@y.test"].status is RecipientStatus.DELIVERED and by["ok@y.test"].last_error is None
    assert by["later@y.test"].status is RecipientStatus.DEFERRED
    assert by["later@y.test"].next_attempt == NOW + 300
    assert by["later@y.test"].last_error == "451 4.3.0 try later"
    assert by["bad@y.test"].status is RecipientStatus.FAILED
    assert by["bad@y.test"].last_error == "550 5.1.1 no such user"
    assert all(r.attempts == 1 for r in msg.recipients)
    assert msg.next_attempt == NOW + 300  # only the deferred recipient counts
    assert not msg.is_final and msg.finished_at is None
    assert msg.leased_until == 0
    assert await store.body(msg_id) == BODY

    attempts = await store.attempts(msg_id)
    assert [(a.recipient, a.result, a.mx, a.detail, a.at) for a in attempts] == [
        ("ok@y.test", "delivered", "mx1.y.test", "tls=TLSv1.3", NOW + 1),
        ("later@y.test", "deferred", "mx1.y.test", "tls=TLSv1.3", NOW + 1),
        ("bad@y.test", "failed", "mx1.y.test", "tls=TLSv1.3", NOW + 1),
    ]
    assert await store.lease_due(NOW + 299, 10, 60) == []
    [again] = await store.lease_due(NOW + 300, 10, 60)
    assert again.id == msg_id

    done = await store.record_results(
        msg_id, [("later@y.test", RecipientStatus.DELIVERED, "250 ok", None)], now=NOW + 301
    )
    assert done.is_final and done.finished_at == NOW + 301 and done.next_attempt is None
    assert done.recipient("later@y.test") is not None
    assert done.recipient("later@y.test").attempts == 2  # type: ignore[union-attr]
    # Tombstone: body gone, envelope, headers and attempts kept; not listed, not leased.
    with pytest.raises(MessageNotFoundError):
        await store.body(msg_id)
    assert await store.headers(msg_id) == BODY[: BODY.index(b"\r\n\r\n") + 2]
    assert len(await store.attempts(msg_id)) == 4
    assert await store.list() == []
    assert [m.id for m in await store.list(include_finished=True)] == [msg_id]
    assert await store.lease_due(NOW + 10_000, 10, 60) == []
    counts = await store.counts(now=NOW + 400)
    assert counts.messages == 0 and counts.finished == 1 and counts.oldest_age is None
    assert await store.integrity_check() == []
    assert await store.purge_finished(before=NOW + 301) == 0
    assert await store.purge_finished(before=NOW + 302) == 1
    assert await store.get(msg_id) is None
    assert await store.attempts(msg_id) == []
    assert await store.integrity_check() == []


async def test_record_results_rejects_nonsense(store: QueueStore) -> None:
    msg_id = await store.put("a@x.test", ["b@y.test", "c@y.test"], BODY, now=NOW)
    with pytest.raises(ValueError, match="not a delivery result"):
        await store.record_results(msg_id, [("b@y.test", RecipientStatus.QUEUED, "", None)], now=NOW)
    with pytest.raises(ValueError, match="next_attempt"):
        await store.record_results(msg_id, [("b@y.test", RecipientStatus.DEFERRED, "451", None)], now=NOW)
    with pytest.raises(ValueError, match="no recipient"):
        await store.record_results(msg_id, [("z@y.test", RecipientStatus.DELIVERED, "250", None)], now=NOW)
    await store.record_results(msg_id, [("b@y.test", RecipientStatus.FAILED, "550", None)], now=NOW)
    with pytest.raises(ValueError, match="already failed"):
        # the whole call fails: c@ is not changed either
        await store.record_results(
            msg_id,
            [
                ("c@y.test", RecipientStatus.DELIVERED, "250", None),
                ("b@y.test", RecipientStatus.DELIVERED, "250", None),
            ],
            now=NOW,
        )
    msg = await store.get(msg_id)
    assert msg is not None
    assert msg.recipient("c@y.test").status is RecipientStatus.QUEUED  # type: ignore[union-attr]
    assert len(await store.attempts(msg_id)) == 1


async def test_set_route(store: QueueStore) -> None:
    msg_id = await store.put("a@x.test", ["b@y.test", "c@z.test"], BODY, now=NOW)
    await store.set_route(msg_id, "c@z.test", "partner-z")
    msg = await store.get(msg_id)
    assert msg is not None
    assert [(r.address, r.route) for r in msg.recipients] == [("b@y.test", None), ("c@z.test", "partner-z")]
    with pytest.raises(MessageNotFoundError):
        await store.set_route(msg_id, "nobody@z.test", "x")


# -- leases --


async def test_due_messages_are_leased_once(store: QueueStore) -> None:
    early = await store.put("a@x.test", ["b@y.test"], BODY, now=NOW)
    late = await store.put("a@x.test", ["b@y.test"], BODY, now=NOW + 50)
    assert await store.lease_due(NOW - 1, 10, 60) == []
    first = await store.lease_due(NOW + 50, 10, 60)
    assert [m.id for m in first] == [early, late]  # most overdue first
    assert all(m.leased_until == NOW + 110 for m in first)
    assert await store.lease_due(NOW + 50, 10, 60) == []  # leased: not handed out twice
    counts = await store.counts(now=NOW + 60)
    assert counts.leased == 2
    # An expired lease (the scheduler died without recording) makes the message due again.
    assert [m.id for m in await store.lease_due(NOW + 110, 10, 60)] == [early, late]
    await store.release_lease(early)
    assert [m.id for m in await store.lease_due(NOW + 111, 10, 60)] == [early]


async def test_concurrent_lease_calls_never_share_a_message(store: QueueStore) -> None:
    for n in range(30):
        await store.put("a@x.test", ["b@y.test"], body_of(n, 100), now=NOW)
    batches = await asyncio.gather(*(store.lease_due(NOW, 7, 60) for _ in range(6)))
    leased = [m.id for batch in batches for m in batch]
    assert len(leased) == 30 and len(set(leased)) == 30


async def test_limit_is_respected(store: QueueStore) -> None:
    for n in range(5):
        await store.put("a@x.test", ["b@y.test"], body_of(n, 100), now=NOW)
    assert len(await store.lease_due(NOW, 3, 60)) == 3
    assert len(await store.lease_due(NOW, 3, 60)) == 2


async def test_reopen_releases_in_flight_leases(tmp_path: Path) -> None:
    store = await QueueStore.open(tmp_path)
    msg_id = await store.put("a@x.test", ["b@y.test"], BODY, now=NOW)
    assert len(await store.lease_due(NOW, 10, 3600)) == 1
    await store.close()  # "crash" with the attempt in flight

    cli = await QueueStore.open(tmp_path, release_leases=False)  # a second process leaves leases alone
    try:
        msg = await cli.get(msg_id)
        assert msg is not None and msg.leased_until == NOW + 3600
    finally:
        await cli.close()

    gateway = await QueueStore.open(tmp_path)
    try:
        [again] = await gateway.lease_due(NOW + 1, 10, 3600)
        assert again.id == msg_id
    finally:
        await gateway.close()


async def test_two_stores_on_one_directory(tmp_path: Path) -> None:
    """The CLI opens the queue while the gateway runs: both see each other's commits, leases exclude."""
    gateway = await QueueStore.open(tmp_path)
    cli = await QueueStore.open(tmp_path, release_leases=False)
    try:
        ids = await asyncio.gather(*(gateway.put("a@x.test", ["b@y.test"], body_of(n), now=NOW) for n in range(20)))
        assert [m.id for m in await cli.list()] == sorted(ids)
        leased_gw, leased_cli = await asyncio.gather(gateway.lease_due(NOW, 15, 60), cli.lease_due(NOW, 15, 60))
        both = [m.id for m in leased_gw] + [m.id for m in leased_cli]
        assert sorted(both) == sorted(ids)
        await cli.hold(ids[0])
        msg = await gateway.get(ids[0])
        assert msg is not None and msg.held
    finally:
        await cli.close()
        await gateway.close()


# -- admin --


async def test_hold_release_delete_flush(store: QueueStore) -> None:
    a = await store.put("a@x.test", ["b@y.test"], BODY, now=NOW)
    b = await store.put("a@x.test", ["b@y.test", "c@y.test"], BODY, now=NOW)

    await store.hold(a)
    assert (await store.get(a)).held  # type: ignore[union-attr]
    assert [m.id for m in await store.lease_due(NOW, 10, 60)] == [b]
    assert (await store.counts(now=NOW)).held == 1

    await store.record_results(
        b,
        [
            ("b@y.test", RecipientStatus.DEFERRED, "451", NOW + 3000),
            ("c@y.test", RecipientStatus.DEFERRED, "451", NOW + 9000),
        ],
        now=NOW,
    )
    assert await store.lease_due(NOW + 10, 10, 60) == []
    assert await store.flush(b, now=NOW + 10) == 2
    flushed = await store.get(b)
    assert flushed is not None and flushed.next_attempt == NOW + 10
    assert [m.id for m in await store.lease_due(NOW + 10, 10, 60)] == [b]
    await store.release_lease(b)

    assert await store.flush(None, now=NOW + 10) == 0  # already due: nothing to change
    assert await store.lease_due(NOW + 10, 10, 60) != []  # b
    assert (await store.get(a)).held  # type: ignore[union-attr]  # flush does not release a hold

    await store.release(a)
    assert [m.id for m in await store.lease_due(NOW + 10, 10, 60)] == [a]

    assert await store.delete(a) is True
    assert await store.get(a) is None
    with pytest.raises(MessageNotFoundError):
        await store.body(a)
    assert await store.delete(a) is False
    with pytest.raises(MessageNotFoundError):
        await store.hold(a)
    with pytest.raises(MessageNotFoundError):
        await store.flush(a, now=NOW)
    assert await store.integrity_check() == []


async def test_counts(store: QueueStore) -> None:
    a = await store.put("a@x.test", ["b@y.test", "c@y.test"], b"12345", now=NOW)
    b = await store.put("a@x.test", ["d@y.test"], b"123", now=NOW + 100)
    await store.record_results(
        a,
        [
            ("b@y.test", RecipientStatus.DELIVERED, "250", None),
            ("c@y.test", RecipientStatus.DEFERRED, "451", NOW + 9),
        ],
        now=NOW,
    )
    await store.hold(b)
    c = await store.counts(now=NOW + 200)
    assert (c.messages, c.held, c.deferred, c.finished, c.bytes, c.oldest_age) == (2, 1, 1, 0, 8, 200.0)
    assert c.recipients_in(RecipientStatus.DELIVERED) == 1
    assert c.recipients_in(RecipientStatus.DEFERRED) == 1
    assert c.recipients_in(RecipientStatus.QUEUED) == 1
    assert c.recipients_in(RecipientStatus.FAILED) == 0


# -- integrity, errors --


async def test_integrity_check_good_and_broken(tmp_path: Path) -> None:
    store = await QueueStore.open(tmp_path)
    msg_id = await store.put("a@x.test", ["b@y.test"], BODY, now=NOW)
    assert await store.integrity_check() == []
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as raw:
        raw.execute("DELETE FROM bodies WHERE id = ?", (msg_id,))
        raw.commit()
    store = await QueueStore.open(tmp_path)
    try:
        assert await store.integrity_check() == [f"{msg_id}: active message without a body"]
    finally:
        await store.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = await QueueStore.open(tmp_path)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(QueueError):
        await store.put("a@x.test", ["b@y.test"], b"x", now=NOW)
    with pytest.raises(QueueError):
        await store.list()


async def test_unusable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(QueueError):
        await QueueStore.open(blocker)


async def _fill_until_full(store: QueueStore, limit: int) -> tuple[dict[str, bytes], QueueFullError]:
    accepted: dict[str, bytes] = {}
    for n in range(limit):
        data = body_of(n, 10 * 1024)
        try:
            accepted[await store.put("a@x.test", ["b@y.test"], data, now=NOW)] = data
        except QueueFullError as exc:
            return accepted, exc
    raise AssertionError(f"no QueueFullError after {limit} puts")


async def test_queue_full_on_size_limit_keeps_the_store_intact(tmp_path: Path) -> None:
    store = await QueueStore.open(tmp_path, max_db_bytes=1024 * 1024)
    try:
        accepted, exc = await _fill_until_full(store, 500)
        assert "full" in str(exc)
        assert 10 < len(accepted) < 110
        # Concurrent puts at the limit: each either fails with QueueFullError or is really stored.
        results = await asyncio.gather(
            *(store.put("a@x.test", ["b@y.test"], body_of(n), now=NOW) for n in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(r, QueueFullError) for r in results if not isinstance(r, str))
        for r in results:
            if isinstance(r, str):
                accepted[r] = await store.body(r)
        assert await store.integrity_check() == []
        for msg_id, data in accepted.items():
            assert await store.body(msg_id) == data
        # Other writes still work (they need no new pages).
        await store.hold(next(iter(accepted)))
    finally:
        await store.close()
    bigger = await QueueStore.open(tmp_path, max_db_bytes=64 * 1024 * 1024)
    try:
        assert {m.id for m in await bigger.list()} == set(accepted)
        await bigger.put("a@x.test", ["b@y.test"], body_of(1), now=NOW)
        assert await bigger.integrity_check() == []
    finally:
        await bigger.close()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
        timeout=10,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False, timeout=10)


async def test_queue_full_on_a_full_filesystem(tiny_fs: Path) -> None:
    store = await QueueStore.open(tiny_fs)
    try:
        accepted, _ = await _fill_until_full(store, 500)
        assert len(accepted) > 5
        assert await store.integrity_check() == []
        for msg_id, data in accepted.items():
            assert await store.body(msg_id) == data
        assert len(await store.list()) == len(accepted)
    finally:
        await store.close()
    # The disk grows (the operator freed space): the store opens and accepts again, nothing lost.
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True, timeout=10)
    store = await QueueStore.open(tiny_fs)
    try:
        assert {m.id for m in await store.list()} == set(accepted)
        await store.put("a@x.test", ["b@y.test"], body_of(1), now=NOW)
        assert await store.integrity_check() == []
    finally:
        await store.close()


# -- the scheduler's short cuts --


async def test_put_leased_returns_the_stored_message_leased(store: QueueStore) -> None:
    msg = await store.put_leased(
        "a@example.org",
        ["b@example.net", NewRecipient("c@example.net", dsn_notify="NEVER"), "b@example.net"],
        BODY,
        meta=MessageMeta(client_ip="192.0.2.1"),
        message_id="<m1@example.org>",
        now=NOW,
        lease_seconds=900,
    )
    stored = await store.get(msg.id)
    assert stored == msg  # the in-memory copy is exactly what a read gives back
    assert msg.leased_until == NOW + 900 and [r.address for r in msg.recipients] == ["b@example.net", "c@example.net"]
    assert await store.lease_due(NOW + 10, 10, 60) == []  # already leased: no round finds it
    assert [m.id for m in await store.lease_due(NOW + 901, 10, 60)] == [msg.id]  # a lost lease expires


async def test_only_durable_jobs_fsync(store: QueueStore) -> None:
    before = store.stats
    msg_id = await store.put("a@example.org", ["b@example.net"], BODY, now=NOW)
    after_put = store.stats
    assert (after_put.commits - before.commits, after_put.fsyncs - before.fsyncs) == (1, 1)
    [msg] = await store.lease_due(NOW, 10, 60)
    await store.record_results(
        msg.id, [RecipientResult("b@example.net", RecipientStatus.DELIVERED, "250 ok", None)], now=NOW
    )
    after = store.stats
    assert after.commits - after_put.commits == 2 and after.fsyncs == after_put.fsyncs  # bookkeeping: no fsync
    await store.hold(msg_id)  # administration stays durable
    assert store.stats.fsyncs == after.fsyncs + 1
    # a process crash right now keeps the unsynced commits (they are in the WAL, in the page cache)
    reader = sqlite3.connect(store.path)
    try:
        assert reader.execute("SELECT finished_at FROM messages WHERE id = ?", (msg_id,)).fetchone()[0] == NOW
    finally:
        reader.close()


async def test_lease_due_walks_due_order_past_leased_messages(store: QueueStore) -> None:
    ids = [
        await store.put("a@example.org", [f"r{i}@example.net", f"s{i}@example.net"], BODY, now=NOW + i)
        for i in range(60)
    ]
    first = await store.lease_due(NOW + 100, 10, 60)
    assert [m.id for m in first] == ids[:10]  # each message once, although it has two due recipients
    second = await store.lease_due(NOW + 100, 25, 60)
    assert [m.id for m in second] == ids[10:35]  # the leased ones are skipped, order kept
    await store.hold(ids[35])
    third = await store.lease_due(NOW + 100, 100, 60)
    assert [m.id for m in third] == ids[36:]


async def test_record_results_sets_routes_in_the_same_transaction(store: QueueStore) -> None:
    msg_id = await store.put("a@example.org", ["b@example.net", "c@example.net"], BODY, now=NOW)
    [msg] = await store.lease_due(NOW, 10, 60)
    updated = await store.record_results(
        msg.id,
        [RecipientResult("b@example.net", RecipientStatus.DELIVERED, "250 ok", None)],
        now=NOW,
        routes={"b@example.net": "internet", "c@example.net": "partner"},
    )
    assert {r.address: r.route for r in updated.recipients} == {"b@example.net": "internet", "c@example.net": "partner"}
    assert updated == await store.get(msg_id)


async def test_record_results_with_the_known_copy_reads_nothing_back(store: QueueStore) -> None:
    msg_id = await store.put("a@example.org", ["b@example.net", "c@example.net", "d@example.net"], BODY, now=NOW)
    [leased] = await store.lease_due(NOW, 10, 60)
    first = await store.record_results(
        msg_id,
        [
            RecipientResult("b@example.net", RecipientStatus.DELIVERED, "250 ok", None),
            RecipientResult("c@example.net", RecipientStatus.DEFERRED, "451 busy", NOW + 60),
        ],
        now=NOW,
        routes={"b@example.net": "internet", "c@example.net": "internet", "d@example.net": "partner"},
        known=leased,
    )
    assert first == await store.get(msg_id)  # the same as a read, down to routes, attempts and the lease
    [again] = await store.lease_due(NOW + 60, 10, 60)
    done = await store.record_results(
        msg_id,
        [
            RecipientResult("c@example.net", RecipientStatus.FAILED, "550 no", None),
            RecipientResult("d@example.net", RecipientStatus.DELIVERED, "250 ok", None),
        ],
        now=NOW + 60,
        known=again,
    )
    assert done == await store.get(msg_id) and done.finished_at == NOW + 60


# --- DSN and REQUIRETLS kept with the message (schema 2) ----------------------------------------------------------


async def test_message_options_and_recipient_dsn_round_trip(store: QueueStore) -> None:
    from mxgate.core.messages import MessageOptions, NewRecipient
    from mxgate.core.model import DsnRet

    options = MessageOptions(DsnRet.HDRS, "env id 1", requiretls=True)
    recipients = [NewRecipient("a@example.org", "SUCCESS,FAILURE", "rfc822;A@Example.org"), "b@example.org"]
    msg_id = await store.put("s@example.net", recipients, b"Subject: x\r\n\r\nx\r\n", now=1000.0, options=options)
    plain_id = await store.put("s@example.net", ["c@example.org"], b"Subject: y\r\n\r\ny\r\n", now=1000.0)
    msg = await store.get(msg_id)
    assert msg is not None and msg.options == options and msg.requiretls
    a, b = msg.recipients
    assert (a.dsn_notify, a.orcpt) == ("SUCCESS,FAILURE", "rfc822;A@Example.org")
    assert (b.dsn_notify, b.orcpt) == (None, None)
    plain = await store.get(plain_id)
    assert plain is not None and plain.options == MessageOptions() and not plain.requiretls
    # leased straight from put (the receive short cut) carries them too
    leased = await store.put_leased("s@example.net", ["d@example.org"], b"x\r\n", now=1.0, options=options)
    assert leased.options == options


async def test_schema_1_store_is_migrated(tmp_path: Path) -> None:
    """A store written by the previous version (schema 1: no option columns) opens, keeps its messages and
    takes the new fields."""
    from mxgate.core.messages import MessageOptions

    s = await QueueStore.open(tmp_path)
    old_id = await s.put("s@example.net", ["a@example.org"], b"x\r\n", now=5.0)
    await s.close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    with conn:  # turn it back into a schema-1 store
        for column in ("dsn_ret", "envid", "requiretls"):
            conn.execute(f"ALTER TABLE messages DROP COLUMN {column}")
        for column in ("dsn_notify", "orcpt"):
            conn.execute(f"ALTER TABLE recipients DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    s = await QueueStore.open(tmp_path)
    try:
        old = await s.get(old_id)
        assert old is not None and old.options == MessageOptions() and old.recipients[0].address == "a@example.org"
        new_id = await s.put("s@example.net", ["b@example.org"], b"y\r\n", now=6.0, options=MessageOptions(envid="E"))
        new = await s.get(new_id)
        assert new is not None and new.options.envid == "E"
    finally:
        await s.close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# --- message metadata: typed in memory, the same (key, value) pairs on disk as before ----------------------------


async def test_metadata_written_by_the_previous_version_loads_typed(tmp_path: Path) -> None:
    """A queue written before ``MessageMeta`` (string pairs in the ``meta`` column, as the receive side, the
    scheduler's DSNs and expansions and TLS-RPT wrote them) opens and reads as typed values; nothing is lost."""
    import json

    s = await QueueStore.open(tmp_path)
    received = await s.put("s@example.net", ["a@example.org"], b"x\r\n", now=5.0)
    report = await s.put("s@example.net", ["b@example.org"], b"x\r\n", now=5.0)
    expansion = await s.put("s@example.net", ["c@example.org"], b"x\r\n", now=5.0)
    dsn = await s.put("", ["s@example.net"], b"x\r\n", now=5.0)
    await s.close()
    old = {
        received: [["client_ip", "192.0.2.7"], ["helo", "mx.example.net"], ["listener", "smtp"],
                   ["connector", "partner"], ["session", "01ABC"], ["body", "8BITMIME"], ["smtputf8", "yes"],
                   ["tls", "TLSv1.3"], ["cipher", "TLS_AES_256_GCM_SHA384"], ["auth_user", "alice"],
                   ["internal", "yes"], ["future_key", "kept"]],
        report: [["origin", "tlsrpt"], ["tls_required", "no"]],
        expansion: [["client_ip", "192.0.2.7"], ["body", "7BIT"], ["categorized", "1"],
                    ["expanded_from", f"{received} list@example.org"]],
        dsn: [["dsn_for", received]],
    }  # fmt: skip
    conn = sqlite3.connect(tmp_path / DB_NAME)
    with conn:
        for msg_id, pairs in old.items():
            conn.execute("UPDATE messages SET meta = ? WHERE id = ?", (json.dumps(pairs), msg_id))
    conn.close()
    s = await QueueStore.open(tmp_path)
    try:
        got = {m.id: m.meta for m in await s.list()}
        assert got[received] == MessageMeta(
            listener="smtp",
            inbound_connector="partner",
            session="01ABC",
            client_ip="192.0.2.7",
            helo="mx.example.net",
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384",
            auth_user="alice",
            internal=True,
            body_8bit=True,
            smtputf8=True,
            extra={"future_key": "kept"},
        )
        assert got[report] == MessageMeta(origin="tlsrpt", tls_required_no=True)
        assert got[expansion] == MessageMeta(
            client_ip="192.0.2.7", categorized=True, expanded_from=(received, "list@example.org")
        )
        assert got[dsn] == MessageMeta(dsn_for=received)
        # and written back as the same pairs, which an older version reads (a plugin's key under "extra.")
        for msg_id, pairs in old.items():
            expected = {(k, v) if k != "future_key" else ("extra.future_key", v) for k, v in pairs}
            assert set(got[msg_id].to_pairs()) == expected - {("body", "7BIT")}
    finally:
        await s.close()


async def test_metadata_pairs_are_still_accepted_by_put(store: QueueStore) -> None:
    """Callers written before the type (``meta=[("origin", "x"), ...]``) get the typed value back."""
    msg_id = await store.put("s@example.net", ["a@example.org"], b"x\r\n", now=5.0, meta=[("tls_required", "no")])
    msg = await store.get(msg_id)
    assert msg is not None and msg.meta == MessageMeta(tls_required_no=True)
