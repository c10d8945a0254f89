"""Text from the network on an operator's terminal, and in addresses.

Subjects, Message-IDs, HELO names, SMTPUTF8 addresses and remote replies are attacker-chosen. Printed as they
came, ESC and C1 CSI sequences drive the terminal (retitle it, rewrite lines, fake output), BEL rings, and bidi
overrides (U+202E) reorder what is shown. So every CLI line that carries such text goes through :func:`escape`
(controls, format characters, separators and undecodable bytes become ``\\xNN`` / ``\\uNNNN``), and ``key=value``
output goes through :func:`quote`, so a value containing `` client=10.9.8.7`` cannot pose as another field.

:func:`address_problem` is the receive side: C0/C1 controls and bidi controls have no business in a mailbox
(RFC 5321's ASCII grammar already excludes C0; RFC 6531's UTF8-non-ascii would let C1 and bidi controls in).
"""

from __future__ import annotations

import json
import unicodedata
from typing import Final

__all__ = ["address_problem", "escape", "quote"]

# Unicode general categories shown escaped: Cc controls (C0, DEL, C1), Cf format characters (bidi controls,
# zero-width characters, the BOM), Cs lone surrogates (undecodable bytes under surrogateescape), Zl/Zp separators.
_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Bidirectional formatting characters (Unicode UAX #9): ALM, LRM, RLM, LRE..RLO, LRI..PDI.
BIDI_CONTROLS: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe(c: str) -> bool:
    if " " <= c <= "~":  # printable ASCII: the common case, decided without a table lookup
        return False
    return unicodedata.category(c) in _UNSAFE_CATEGORIES


def _escape_char(c: str) -> str:
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{n - 0xDC00:02x}"
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def escape(text: object) -> str:
    """``text`` (``str()`` of anything else) safe for a terminal: backslashes doubled; every control, format or
    separator character and every undecodable byte written as a Python-style escape. Printable text, including
    non-ASCII letters, is left alone."""
    s = text if isinstance(text, str) else str(text)
    if s.isascii() and s.isprintable() and "\\" not in s:
        return s
    return "".join("\\\\" if c == "\\" else _escape_char(c) if _unsafe(c) else c for c in s)


def quote(value: object) -> str:
    """One ``key=value`` value: escaped, and in double quotes (``"`` inside as ``\\"``) when it is empty or
    holds a space, ``=`` or ``"`` -- so it ends where it seems to end. Lists and mappings are written as JSON."""
    if isinstance(value, bool | int | float) or value is None:
        return escape(json.dumps(value))
    text = json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, list | tuple | dict) else value
    s = escape(text)
    if s and not any(c in s for c in ' ="'):
        return s
    return '"' + s.replace('"', '\\"') + '"'


def address_problem(text: str) -> str | None:
    """Why an address may not be accepted: a C0/C1 control (or DEL) or a bidi control in it; ``None`` if none."""
    for c in text:
        if c in BIDI_CONTROLS:
            return f"bidirectional control U+{ord(c):04X} in address"
        if (c < " " or "\x7f" <= c <= "\x9f") or unicodedata.category(c) in ("Zl", "Zp"):
            return f"control character U+{ord(c):04X} in address"
    return None
