"""Escaping and quoting of network text for the terminal (mxgate.core.textsafe)."""

from __future__ import annotations

import unicodedata

import pytest

from mxgate.core.textsafe import address_problem, escape, quote


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("jürgen 名前", "jürgen 名前"),
        ("\x1b]0;t\x07", "\\x1b]0;t\\x07"),
        ("\x9b31m", "\\x9b31m"),
        ("a\u202eb\u2066c\u200bd\ufeff", "a\\u202eb\\u2066c\\u200bd\\ufeff"),
        ("line\nbreak\r\u2028", "line\\x0abreak\\x0d\\u2028"),
        ("back\\slash", "back\\\\slash"),
        ("bad \udcff byte", "bad \\xff byte"),
        ("\U000e0041 tag", "\\U000e0041 tag"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_escaped_text_has_nothing_a_terminal_acts_on() -> None:
    everything = "".join(chr(n) for n in range(0x0, 0x3000) if not 0xD800 <= n < 0xDC80 and not 0xDD00 <= n < 0xE000)
    out = escape(everything)
    assert not [c for c in out if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def test_quote_keeps_a_value_in_one_field() -> None:
    assert quote("plain") == "plain"
    assert quote("") == '""'
    assert quote('"pad client=1 x"@d') == '"\\"pad client=1 x\\"@d"'
    assert quote(3) == "3" and quote(True) == "true"
    assert quote(["a", "b c"]) == '"[\\"a\\", \\"b c\\"]"'


def test_address_problem() -> None:
    assert address_problem("jürgen@bücher.example") is None
    assert address_problem('"a b"@d') is None
    assert "U+202E" in (address_problem("a\u202e@d") or "")
    assert "U+0085" in (address_problem("a\x85@d") or "")
    assert "U+0000" in (address_problem("\x00@d") or "")
