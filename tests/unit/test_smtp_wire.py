"""The receive side's framing without sockets (:mod:`mxgate.core.smtp.wire`): bytes in, events out. Every smuggling
vector of the socket tests (tests/integration/test_receive_smtp.py, test_receive_extensions.py) is here as a pure
test of where a line, a message or a chunk ends."""

from __future__ import annotations

import pytest

from mxgate.core.smtp import wire
from mxgate.core.smtp.wire import (
    BareLineEnding,
    ChunkEnded,
    Command,
    ConnectionClosed,
    HeadersEnded,
    LineTooLong,
    MessageEnded,
    MessageRefused,
    NeedData,
    Refusal,
    WireReader,
)

VECTORS = [b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\n", b"\r\n.\n"]
VECTOR_IDS = ["LF.CRLF", "CR.CRLF", "CRLF.CR", "LF.LF", "CRLF.LF"]


def events(reader: WireReader) -> list[wire.Event]:
    """Every event up to the next NeedData / ConnectionClosed (included)."""
    out: list[wire.Event] = []
    while True:
        ev = reader.next_event()
        out.append(ev)
        if isinstance(ev, NeedData | ConnectionClosed):
            return out


def feed(reader: WireReader, *pieces: bytes) -> list[wire.Event]:
    out: list[wire.Event] = []
    for piece in pieces:
        reader.receive_data(piece)
        out += [e for e in events(reader) if not isinstance(e, NeedData)]
    return out


def read_message(data: bytes, *, limit: int = 10**6, split: int = 0) -> list[wire.Event]:
    r = WireReader()
    r.start_data(limit)
    pieces = [data[i : i + split] for i in range(0, len(data), split)] if split else [data]
    return feed(r, *pieces)


# --- command mode -----------------------------------------------------------------------------------------------


def test_commands_pipelined_in_one_packet() -> None:
    r = WireReader()
    assert feed(r, b"EHLO c.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n") == [
        Command(b"EHLO c.example"),
        Command(b"MAIL FROM:<a@b>"),
        Command(b"RCPT TO:<c@d>"),
        Command(b"DATA"),
    ]


def test_command_split_across_reads() -> None:
    r = WireReader()
    assert feed(r, b"NO", b"OP", b"\r", b"\n") == [Command(b"NOOP")]
    assert r.buffered == 0 and not r.line_started


@pytest.mark.parametrize(
    "data",
    [b"EHLO c.example\n", b"NOOP\rMAIL FROM:<a@b.example>\r\n", b"\n", b"\r\r\n", b"NOOP\r\r\n", b"A\rB\r\n"],
)
def test_bare_cr_or_lf_in_a_command(data: bytes) -> None:
    r = WireReader()
    evs = feed(r, data + b"HELO c.example\r\n")
    assert evs[0] == BareLineEnding()
    assert evs[-1] == Command(b"HELO c.example")  # the session goes on at the next line
    assert not any(isinstance(e, Command) and b"MAIL" in e.line for e in evs)


def test_line_too_long_is_discarded_as_it_arrives() -> None:
    r = WireReader(line_limit=512)
    evs = feed(r, b"NOOP " + b"x" * 600)
    assert evs == [] and r.discarding_line and r.buffered == 0 and r.line_started
    assert feed(r, b"y" * 10_000) == [] and r.buffered == 0
    assert feed(r, b"zz\r\nNOOP\r\n") == [LineTooLong(), Command(b"NOOP")]
    assert not r.discarding_line


def test_line_too_long_in_one_piece() -> None:
    r = WireReader(line_limit=512)
    assert feed(r, b"NOOP " + b"x" * 600 + b"\r\nQUIT\r\n") == [LineTooLong(), Command(b"QUIT")]
    # exactly at the limit, CRLF included, is fine
    assert feed(r, b"x" * 510 + b"\r\n") == [Command(b"x" * 510)]
    assert feed(r, b"x" * 511 + b"\r\n") == [LineTooLong()]


def test_line_limit_is_the_drivers() -> None:
    r = WireReader(line_limit=512)
    r.line_limit = 12288  # AUTH's
    assert feed(r, b"AUTH PLAIN " + b"A" * 5000 + b"\r\n") == [Command(b"AUTH PLAIN " + b"A" * 5000)]


def test_discard_buffered_drops_what_was_pipelined_after_starttls() -> None:
    r = WireReader()
    r.receive_data(b"STARTTLS\r\nMAIL FROM:<inject@example.net>\r\nRCPT TO:<u@example.org>\r\n")
    assert r.next_event() == Command(b"STARTTLS")
    r.discard_buffered()
    assert isinstance(r.next_event(), NeedData)
    assert feed(r, b"EHLO c.example\r\n") == [Command(b"EHLO c.example")]


def test_end_of_input() -> None:
    r = WireReader()
    r.receive_data(b"NOOP\r\nQUI")
    r.receive_data(b"")
    assert events(r) == [Command(b"NOOP"), ConnectionClosed()]


# --- DATA -------------------------------------------------------------------------------------------------------


def test_message_with_pipelined_commands_after_it() -> None:
    r = WireReader()
    r.start_data(1000)
    evs = feed(r, b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert evs == [
        HeadersEnded(b"Subject: hi\r\n"),
        MessageEnded(b"Subject: hi\r\n\r\nbody\r\n", 21),
        Command(b"QUIT"),
    ]


@pytest.mark.parametrize("split", [0, 1, 2, 3, 7])
def test_message_end_across_reads(split: int) -> None:
    evs = read_message(b"Subject: hi\r\n\r\nbody\r\n.\r\n", split=split)
    assert evs == [HeadersEnded(b"Subject: hi\r\n"), MessageEnded(b"Subject: hi\r\n\r\nbody\r\n", 21)]


def test_empty_message_and_first_line_dot() -> None:
    assert read_message(b".\r\n") == [HeadersEnded(b""), MessageEnded(b"", 0)]
    # a message without headers' end: the header block is all of it, reported at the end
    assert read_message(b"no blank line\r\n.\r\n") == [
        HeadersEnded(b"no blank line\r\n"),
        MessageEnded(b"no blank line\r\n", 15),
    ]


def test_dot_unstuffing() -> None:
    data = b"Subject: x\r\n\r\n." + b"." * 998 + b"\r\n..\r\n...x\r\n.\r\n"
    (_, end) = read_message(data)
    assert end == MessageEnded(b"Subject: x\r\n\r\n" + b"." * 998 + b"\r\n.\r\n..x\r\n", len(data) - 3)
    # a leading dot on the first line too
    assert read_message(b"..a: b\r\n\r\nx\r\n.\r\n")[-1] == MessageEnded(b".a: b\r\n\r\nx\r\n", 13)


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
@pytest.mark.parametrize("split", [0, 1, 5])
def test_smuggling_vectors_end_nothing(vector: bytes, split: int) -> None:
    """A bare CR or LF around the dot never ends the message: the smuggled commands stay message content, the
    message (ended by the real CRLF.CRLF) is refused, and the next command is read as one."""
    smuggled = (
        b"Subject: hi\r\n\r\nbody" + vector + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n"
    )
    evs = read_message(smuggled + b"evil\r\n.\r\nNOOP\r\n", split=split)
    assert evs[-2:] == [MessageRefused(Refusal.BARE_LINE_ENDING), Command(b"NOOP")]
    # the header block is reported when it arrives before the end; with the end in the same read, the bare line
    # ending is refused first (no header hook for a message refused anyway)
    assert evs[:-2] == ([HeadersEnded(b"Subject: hi\r\n")] if split else [])


@pytest.mark.parametrize("bad", [b"bare LF\n", b"bare CR\r", b"x\r\r\n", b"\n\r\n"])
def test_bare_line_ending_anywhere_in_data(bad: bytes) -> None:
    assert read_message(b"a: b\r\n\r\n" + bad + b"more\r\n.\r\n")[-1] == MessageRefused(Refusal.BARE_LINE_ENDING)


def test_bare_line_ending_refused_before_the_header_block() -> None:
    # no header end and a bare LF: refused without asking about headers (as the server did)
    assert read_message(b"a: b\nc: d\r\n.\r\n") == [MessageRefused(Refusal.BARE_LINE_ENDING)]


def test_size_limit_mid_stream_then_discarded() -> None:
    r = WireReader()
    r.start_data(20000)
    line = b"y" * 998 + b"\r\n"
    out = feed(r, b"Subject: x\r\n\r\n", *(line for _ in range(30)))
    assert out == [HeadersEnded(b"Subject: x\r\n")]
    assert len(r._msg) <= 4  # past the limit only the possible start of the terminator is held
    assert feed(r, b".\r\nNOOP\r\n") == [MessageRefused(Refusal.TOO_BIG), Command(b"NOOP")]
    assert r.data_received == 14 + 30 * 1000 + 9


def test_size_limit_at_the_end() -> None:
    assert read_message(b"a: b\r\n\r\n123\r\n.\r\n", limit=12)[-1] == MessageRefused(Refusal.TOO_BIG)
    assert read_message(b"a: b\r\n\r\n1\r\n.\r\n", limit=11)[-1] == MessageEnded(b"a: b\r\n\r\n1\r\n", 11)


def test_refused_at_headers_reads_to_the_end() -> None:
    r = WireReader()
    r.start_data(10**6)
    r.receive_data(b"Subject: no\r\n\r\n")
    assert r.next_event() == HeadersEnded(b"Subject: no\r\n")
    r.refuse()
    assert isinstance(r.next_event(), NeedData)
    assert feed(r, b"x" * 5000, b"\r\n", b".\r\nRSET\r\n") == [MessageRefused(Refusal.REFUSED), Command(b"RSET")]


def test_refused_at_headers_found_at_the_end() -> None:
    r = WireReader()
    r.start_data(10**6)
    r.receive_data(b"Subject: no\r\n.\r\n")
    assert r.next_event() == HeadersEnded(b"Subject: no\r\n")
    r.refuse()
    assert r.next_event() == MessageRefused(Refusal.REFUSED)


def test_header_end_split_across_reads() -> None:
    r = WireReader()
    r.start_data(10**6)
    assert feed(r, b"a: b\r", b"\n", b"\r") == []
    assert feed(r, b"\nbody\r\n.\r\n") == [HeadersEnded(b"a: b\r\n"), MessageEnded(b"a: b\r\n\r\nbody\r\n", 14)]


def test_data_received_counts_pipelined_input() -> None:
    r = WireReader()
    r.start_data(100)
    feed(r, b"x\r\n.\r\nNOOP\r\n")
    assert r.data_received == 12


# --- BDAT -------------------------------------------------------------------------------------------------------


def test_bdat_chunk_is_exact_and_never_commands() -> None:
    c1 = b"Subject: chunked\r\n\r\nQUIT\r\n.\r\nMAIL FROM:<evil@example.net>\r\n"
    r = WireReader()
    sink = bytearray()
    r.receive_data(b"BDAT %d\r\n" % len(c1) + c1 + b"NOOP\r\n")
    assert r.next_event() == Command(b"BDAT %d" % len(c1))
    r.start_chunk(len(c1), sink)
    assert r.next_event() == ChunkEnded(len(c1))
    assert bytes(sink) == c1
    assert events(r) == [Command(b"NOOP"), NeedData()]


@pytest.mark.parametrize("split", [1, 3, 100])
def test_bdat_chunk_across_reads(split: int) -> None:
    chunk = b"..leading dots stay\r\n.\r\n" * 10
    r = WireReader()
    sink = bytearray()
    r.start_chunk(len(chunk), sink)
    evs = feed(r, *(chunk[i : i + split] for i in range(0, len(chunk), split)), b"RSET\r\n")
    assert evs == [ChunkEnded(len(chunk)), Command(b"RSET")]
    assert bytes(sink) == chunk and r.chunk_received == len(chunk)


def test_bdat_refused_chunk_is_read_and_dropped() -> None:
    r = WireReader()
    r.start_chunk(6, None)
    assert feed(r, b"QUIT\r\nRSET\r\n") == [ChunkEnded(6), Command(b"RSET")]


def test_bdat_zero() -> None:
    r = WireReader()
    r.start_chunk(0, bytearray())
    assert r.next_event() == ChunkEnded(0)


@pytest.mark.parametrize("vector", [*VECTORS, b"\n"], ids=[*VECTOR_IDS, "LF"])
def test_bdat_assembled_bare_line_endings(vector: bytes) -> None:
    """BDAT content is not framed by lines; the assembled message is checked (as the server's check_text does)."""
    c1 = b"Subject: hi\r\n\r\nbody" + vector[:1]
    c2 = vector[1:] + b"MAIL FROM:<evil@example.net>\r\n"
    r = WireReader()
    sink = bytearray()
    for c in (c1, c2):
        r.start_chunk(len(c), sink)
        assert feed(r, c) == [ChunkEnded(len(c))]
    assert wire.has_bare_line_ending(bytes(sink))


def test_helpers() -> None:
    assert wire.unstuff(b".a\r\n..b\r\n") == b"a\r\n.b\r\n"
    assert not wire.has_bare_line_ending(b"a\r\nb\r\n")
    assert wire.has_bare_line_ending(b"a\nb\r\n") and wire.has_bare_line_ending(b"a\rb\r\n")
