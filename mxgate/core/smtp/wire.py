"""The receive side's framing, without sockets (h11's shape): bytes in with :meth:`WireReader.receive_data`, events
out with :meth:`WireReader.next_event`. The driver (:mod:`mxgate.core.smtp.connection`) owns time, replies and hooks;
this module owns where a command line, a DATA message or a BDAT chunk ends -- which is where SMTP smuggling lives.

Three modes, switched by the driver:

- **command** (the default): CRLF-terminated lines. A line with a bare CR or LF anywhere is :class:`BareLineEnding`;
  a line longer than the limit is :class:`LineTooLong`, and it is discarded as it arrives (nothing beyond the limit
  is held).
- **DATA** (:meth:`WireReader.start_data`): the content up to CRLF.CRLF, and only that (``\\n.\\r\\n``,
  ``\\r.\\r\\n``, ``\\n.\\n`` ... end nothing). Read in bulk: ``find`` over whole chunks, never line by line. The
  header block is reported once (:class:`HeadersEnded`); past the size limit, or after :meth:`WireReader.refuse`,
  input is only scanned for the end and dropped. A message with a bare CR or LF is refused; an accepted one comes
  dot-unstuffed (:class:`MessageEnded`).
- **BDAT** (:meth:`WireReader.start_chunk`): exactly N octets, never unstuffed, never parsed for commands.

Whatever follows the end of a message or chunk is read as commands again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "BareLineEnding",
    "ChunkEnded",
    "Command",
    "ConnectionClosed",
    "Event",
    "HeadersEnded",
    "LineTooLong",
    "MessageEnded",
    "MessageRefused",
    "NeedData",
    "Refusal",
    "WireReader",
    "unstuff",
]


# --- events -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing more can be said until more input arrives."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side and nothing complete is left in the buffer."""


@dataclass(frozen=True, slots=True)
class Command:
    """One command line, without its CRLF (every CR and LF in it was part of that CRLF)."""

    line: bytes


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A command line over the limit (already discarded up to its end)."""


@dataclass(frozen=True, slots=True)
class BareLineEnding:
    """A command line with a CR or LF that is not part of its terminating CRLF."""


@dataclass(frozen=True, slots=True)
class HeadersEnded:
    """The header block of a DATA message, each line with its CRLF (as received: dot-stuffing not removed).

    Reported once per message, as soon as the empty line after the headers arrived, or at the end of a message
    that has none (then the whole content). The driver may :meth:`WireReader.refuse` the message now."""

    block: bytes


@dataclass(frozen=True, slots=True)
class MessageEnded:
    """A DATA message up to (not including) the ending ``.CRLF``, dot-unstuffed; ``size``: octets as received."""

    content: bytes
    size: int


class Refusal(enum.Enum):
    TOO_BIG = "too_big"  # over the size limit given to start_data
    BARE_LINE_ENDING = "bare_line_ending"  # a CR or LF not part of a CRLF: a smuggling attempt or a broken client
    REFUSED = "refused"  # the driver refused it (WireReader.refuse, e.g. a header hook said no)


@dataclass(frozen=True, slots=True)
class MessageRefused:
    """A DATA message read to its end and dropped."""

    reason: Refusal


@dataclass(frozen=True, slots=True)
class ChunkEnded:
    """All ``size`` octets of a BDAT chunk were read (into the sink given to :meth:`WireReader.start_chunk`)."""

    size: int


Event = (
    NeedData
    | ConnectionClosed
    | Command
    | LineTooLong
    | BareLineEnding
    | HeadersEnded
    | MessageEnded
    | MessageRefused
    | ChunkEnded
)

NEED_DATA: Final = NeedData()
CLOSED: Final = ConnectionClosed()
LINE_TOO_LONG: Final = LineTooLong()
BARE_LINE_ENDING: Final = BareLineEnding()


def unstuff(raw: bytes) -> bytes:
    """RFC 5321 §4.5.2: remove the transparency dots."""
    if raw.startswith(b"."):
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n")


def has_bare_line_ending(raw: bytes) -> bool:
    """True when ``raw`` holds a CR or LF that is not part of a CRLF (three ``count`` calls, no loop)."""
    lf = raw.count(b"\n")
    return lf != raw.count(b"\r\n") or raw.count(b"\r") != lf


# --- the reader ---------------------------------------------------------------------------------------------------


class WireReader:
    """The input of one connection. Feed it with :meth:`receive_data`; ask it :meth:`next_event` until
    :class:`NeedData`. Starts in command mode with ``line_limit`` (CRLF included)."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_chunk_size",
        "_discarding",
        "_discarding_line",
        "_end_content",
        "_eof",
        "_headers_done",
        "_hscan",
        "_msg",
        "_refusal",
        "_scan",
        "_sink",
        "_size_limit",
        "data_received",
        "line_limit",
        "next_event",
    )

    def __init__(self, line_limit: int = 512) -> None:
        self.line_limit = line_limit
        self._buf = bytearray()
        # the current mode's reading method (an attribute, not a method dispatching on the mode: the hot path)
        self.next_event: Callable[[], Event] = self._line
        self._eof = False
        self._scan = 0
        self._discarding_line = False
        # DATA
        self._msg = bytearray()
        self._hscan = 0
        self._headers_done = False
        self._discarding = False
        self._refusal: Refusal | None = None
        self._size_limit = 0
        self._end_content = b""
        self.data_received = 0  # octets taken in since start_data (the driver's minimum-rate deadline)
        # BDAT
        self._sink: bytearray | None = None
        self._chunk_size = 0
        self._chunk_left = 0

    # -- input -------------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """More input; ``b""`` is the end of input (the client closed its side)."""
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Octets received and not yet taken by an event (what flow control counts)."""
        return len(self._buf)

    @property
    def line_started(self) -> bool:
        """A command line has begun and not ended (its deadline runs)."""
        return bool(self._buf) or self._discarding_line

    @property
    def discarding_line(self) -> bool:
        """An over-long line is being dropped up to its end."""
        return self._discarding_line

    @property
    def chunk_received(self) -> int:
        return self._chunk_size - self._chunk_left

    def discard_buffered(self) -> None:
        """Forget all input not yet read (RFC 3207 §4.2: what was pipelined after STARTTLS)."""
        self._buf.clear()
        self._scan = 0

    # -- modes -------------------------------------------------------------------------------------------------

    def start_data(self, size_limit: int) -> None:
        """After ``354``: read a DATA message; more than ``size_limit`` octets of content is refused."""
        self.next_event = self._data
        self._msg = bytearray(b"\r\n")  # the DATA line's CRLF: a first line of "." ends an empty message
        self._scan = self._hscan = 0
        self._headers_done = self._discarding = False
        self._refusal = None
        self._size_limit = size_limit
        self.data_received = 0

    def refuse(self) -> None:
        """Drop the current DATA message (after :class:`HeadersEnded`): it is read to its end, not kept."""
        if self._refusal is None:
            self._refusal = Refusal.REFUSED
        self._discarding = True

    def start_chunk(self, size: int, sink: bytearray | None) -> None:
        """After ``BDAT size``: the next ``size`` octets are the chunk, appended to ``sink`` (``None``: dropped)."""
        self.next_event = self._chunk
        self._sink = sink
        self._chunk_size = self._chunk_left = size

    # -- events (``next_event`` is one of these) ------------------------------------------------------------------

    def _need(self) -> NeedData | ConnectionClosed:
        return CLOSED if self._eof else NEED_DATA

    def _line(self) -> Event:
        buf = self._buf
        if self._discarding_line:
            j = buf.find(b"\n")
            if j >= 0:
                del buf[: j + 1]
                self._discarding_line = False
                return LINE_TOO_LONG
            buf.clear()
            return self._need()
        i = buf.find(b"\n", self._scan)
        if i >= 0:
            self._scan = 0
            if i + 1 > self.line_limit:
                event: Event = LINE_TOO_LONG
            elif i == 0 or buf[i - 1] != 0x0D or buf.find(b"\r", 0, i - 1) >= 0:
                event = BARE_LINE_ENDING
            else:
                event = Command(bytes(buf[: i - 1]))
            del buf[: i + 1]
            return event
        if len(buf) >= self.line_limit:  # over-long: drop it as it arrives, never hold it
            buf.clear()
            self._scan = 0
            self._discarding_line = True
        else:
            self._scan = len(buf)
        return self._need()

    def _data(self) -> Event:
        msg = self._msg
        if self._buf:
            self.data_received += len(self._buf)
            msg += self._buf
            self._buf.clear()
        end = msg.find(b"\r\n.\r\n", self._scan)
        if end >= 0:
            return self._ended(end)
        if not self._discarding and not self._headers_done:
            j = msg.find(b"\r\n\r\n", self._hscan)
            if j >= 0:
                self._headers_done = True
                self._scan = max(0, len(msg) - 4)  # searched for the end already (the next pass goes on from here)
                return HeadersEnded(bytes(msg[2 : j + 2]))
            self._hscan = max(0, len(msg) - 3)
        if not self._discarding and len(msg) - 2 > self._size_limit:
            self._refusal, self._discarding = Refusal.TOO_BIG, True
        if self._discarding and len(msg) > 4:
            del msg[:-4]  # keep only what could start the terminator
        self._scan = max(0, len(msg) - 4)
        return self._need()

    def _ended(self, end: int) -> Event:
        msg = self._msg
        self._buf[:0] = msg[end + 5 :]  # commands pipelined after the message
        self._msg = bytearray()
        self._scan = 0
        self.next_event = self._line
        if self._refusal is not None:
            return MessageRefused(self._refusal)
        if end > self._size_limit:  # content = msg[2 : end + 2]
            return MessageRefused(Refusal.TOO_BIG)
        del msg[end + 2 :]
        del msg[:2]
        raw = bytes(msg)
        del msg
        lf = raw.count(b"\n")  # (has_bare_line_ending, inline)
        if lf != raw.count(b"\r\n") or raw.count(b"\r") != lf:
            return MessageRefused(Refusal.BARE_LINE_ENDING)
        if self._headers_done:
            return MessageEnded(unstuff(raw), len(raw))
        self._headers_done = True
        j = raw.find(b"\r\n\r\n")
        self._end_content = raw
        self.next_event = self._ending  # the message after the driver had its say about the headers
        return HeadersEnded(raw if j < 0 else raw[: j + 2])

    def _ending(self) -> Event:
        raw, self._end_content = self._end_content, b""
        self.next_event = self._line
        if self._refusal is not None:
            return MessageRefused(self._refusal)
        return MessageEnded(unstuff(raw), len(raw))

    def _chunk(self) -> Event:
        buf = self._buf
        take = min(self._chunk_left, len(buf))
        if take:
            if self._sink is not None:
                self._sink += buf[:take]
            del buf[:take]
            self._chunk_left -= take
        if self._chunk_left == 0:
            self.next_event = self._line
            self._sink = None
            return ChunkEnded(self._chunk_size)
        return self._need()
