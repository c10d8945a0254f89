"""Micro-benchmark of the receive side's framing: the server's framing before mxgate/core/smtp/wire.py (transcribed
below without its awaits: the same buffer operations, ``_wait`` replaced by taking the next read) against
:class:`mxgate.core.smtp.wire.WireReader` driven the way ``Connection`` drives it.

Each run feeds N transactions (MAIL, RCPT, DATA pipelined, the message, its end) as one byte stream cut into reads
of ``--read`` octets, and counts messages per second. Not a test; not part of ``make bench``::

    .venv/bin/python bench/wire_micro.py [--messages 20000] [--size 4096] [--read 16384] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

from mxgate.core.smtp import wire

LINE_LIMIT = 12288
SIZE_LIMIT = 50 * 1024 * 1024


def stream(messages: int, size: int) -> bytes:
    body_line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.\r\n"
    dotted = b".a line that starts with a dot\r\n"
    body = (body_line * (size // len(body_line) + 1))[: size - len(dotted)]
    body = body[: body.rfind(b"\r\n") + 2] + dotted
    msg = b"From: a@example.net\r\nTo: u@example.org\r\nSubject: bench\r\n\r\n" + body.replace(b"\r\n.", b"\r\n..")
    tx = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n" + msg + b".\r\n"
    return b"EHLO c.example\r\n" + tx * messages + b"QUIT\r\n"


def reads(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


# --- before: Connection._read_line / _read_data / _accept_message's unstuffing, without awaits -------------------


class Before:
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.buf = bytearray()
        self.chunks = chunks

    def wait(self) -> None:
        self.buf += next(self.chunks)

    def read_line(self, limit: int) -> bytes | None:
        scan = 0
        while True:
            i = self.buf.find(b"\n", scan)
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                if i + 1 > limit:
                    return None
                if i == 0 or line[-2] != 0x0D or line.find(b"\r", 0, i - 1) >= 0:
                    return None
                return line[:-2]
            if len(self.buf) >= limit:
                raise AssertionError("no over-long lines in this stream")
            scan = len(self.buf)
            self.wait()

    def read_data(self, limit: int) -> bytes | None:
        received = 0
        msg = bytearray(b"\r\n")
        scan = hscan = 0
        headers_done = discarding = False
        while True:
            if self.buf:
                received += len(self.buf)
                msg += self.buf
                self.buf.clear()
            end = msg.find(b"\r\n.\r\n", scan)
            if end >= 0:
                self.buf += msg[end + 5 :]
                break
            if not discarding and not headers_done:
                j = msg.find(b"\r\n\r\n", hscan)
                if j >= 0:
                    headers_done = True
                    _ = bytes(msg[2 : j + 2])  # the header block the hook gets
                else:
                    hscan = max(0, len(msg) - 3)
            if not discarding and len(msg) - 2 > limit:
                discarding = True
            if discarding and len(msg) > 4:
                del msg[:-4]
            scan = max(0, len(msg) - 4)
            self.wait()
        if discarding or end > limit:
            return None
        raw = bytes(msg[2 : end + 2])
        lf = raw.count(b"\n")
        if lf != raw.count(b"\r\n") or raw.count(b"\r") != lf:
            return None
        if not headers_done:
            j = raw.find(b"\r\n\r\n")
            _ = raw if j < 0 else raw[: j + 2]
        if raw.startswith(b"."):
            raw = raw[1:]
        return raw.replace(b"\r\n.", b"\r\n")

    def run(self) -> int:
        done = 0
        while True:
            line = self.read_line(LINE_LIMIT)
            assert line is not None
            if line == b"QUIT":
                return done
            if line == b"DATA":
                assert self.read_data(SIZE_LIMIT) is not None
                done += 1


# --- after: WireReader, driven as Connection._next / _read_data drive it ------------------------------------------


class After:
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.reader = wire.WireReader(LINE_LIMIT)
        self.chunks = chunks

    def wait(self) -> None:
        self.reader.receive_data(next(self.chunks))

    def next_command(self) -> wire.Event:
        reader = self.reader
        while True:
            event = reader.next_event()
            if event is not wire.NEED_DATA:
                return event
            self.wait()

    def read_data(self, limit: int) -> bytes | None:
        reader = self.reader
        reader.start_data(limit)
        while True:
            event = reader.next_event()
            if event is wire.NEED_DATA:
                self.wait()
            elif type(event) is wire.HeadersEnded:
                pass  # the hook would be called here
            elif type(event) is wire.MessageEnded:
                return event.content
            else:
                return None

    def run(self) -> int:
        done = 0
        while True:
            event = self.next_command()
            assert type(event) is wire.Command
            if event.line == b"QUIT":
                return done
            if event.line == b"DATA":
                assert self.read_data(SIZE_LIMIT) is not None
                done += 1


def timed(kind: Callable[[Iterator[bytes]], Before | After], data: bytes, read: int) -> float:
    session = kind(reads(data, read))
    t0 = time.process_time()
    session.run()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=int, default=4096, help="message body octets")
    ap.add_argument("--read", type=int, default=16384, help="octets per read (a socket read)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data = stream(args.messages, args.size)
    a = Before(reads(data, args.read))
    b = After(reads(data, args.read))
    assert a.run() == b.run() == args.messages
    results: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        results["before"].append(timed(Before, data, args.read))
        results["after"].append(timed(After, data, args.read))
    print(f"{args.messages} messages of {args.size} octets, reads of {args.read} octets, best of {args.repeat}:")
    for name, runs in results.items():
        best, median = min(runs), statistics.median(runs)
        print(
            f"  {name:6} best {best * 1e3:8.1f} ms  median {median * 1e3:8.1f} ms  "
            f"{args.messages / best:10.0f} msg/s  {best / args.messages * 1e6:6.2f} us/msg"
        )
    ratio = min(results["after"]) / min(results["before"])
    print(f"  after/before (best): {ratio:.3f}")


if __name__ == "__main__":
    main()
