"""Compress-rate lists: the published string form, parsed by a small grammar.

Grammar (whitespace allowed between tokens)::

    expr   := term ("+" term)*
    term   := list ("*" count)?
    list   := "[" number ("," number)* ","? "]"
    number := digits ["." digits] | "." digits   (optionally with an exponent)

``"[0.]+[0.1]*2+[0.4]*5"`` is ``[0.0, 0.1, 0.1, 0.4, 0.4, 0.4, 0.4, 0.4]``.  A
plain comma list ``"0.1, 0.2"`` is accepted too.  Nothing is ever ``eval``-ed.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from norton.errors import NortonError

MAX_ENTRIES = 10_000  # far more than any network has layers

_TOKEN = re.compile(r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<op>[\[\],*+-])|(?P<bad>\S))")


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:  # only trailing whitespace is left
            break
        if match.group("bad") is not None:
            raise NortonError(
                f"compress rate {text!r}: unexpected character {match.group('bad')!r} at position "
                f"{match.start('bad')}; expected a form like \"[0.]+[0.1]*2+[0.4]*5\" or \"0.1,0.2\""
            )
        kind = "number" if match.group("number") is not None else match.group("op")
        value = match.group("number") or match.group("op")
        out.append((kind, value, match.start(kind if kind == "number" else "op")))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0

    def error(self, message: str) -> NortonError:
        return NortonError(
            f"compress rate {self.text!r}: {message}; expected a form like "
            "\"[0.]+[0.1]*2+[0.4]*5\" or \"0.1,0.2\""
        )

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            where = f"at position {self.tokens[self.i][2]}" if self.i < len(self.tokens) else "at the end"
            found = repr(self.tokens[self.i][1]) if self.i < len(self.tokens) else "nothing"
            if kind == "number" and self.peek() == "-":
                raise self.error(f"negative rate {where}; rates must be in [0, 1)")
            raise self.error(f"expected {'a number' if kind == 'number' else repr(kind)} {where}, found {found}")
        value = self.tokens[self.i][1]
        self.i += 1
        return value

    def number(self) -> float:
        return float(self.take("number"))

    def parse(self) -> list[float]:
        if not self.tokens:
            raise self.error("it is empty")
        if self.peek() == "[":
            rates = self.term()
            while self.peek() == "+":
                self.take("+")
                rates += self.term()
                self.check_length(len(rates))
        else:
            rates = [self.number()]
            while self.peek() == ",":
                self.take(",")
                rates.append(self.number())
                self.check_length(len(rates))
        if self.peek() is not None:
            token = self.tokens[self.i]
            raise self.error(f"unexpected {token[1]!r} at position {token[2]}")
        return rates

    def term(self) -> list[float]:
        self.take("[")
        values = [self.number()]
        while self.peek() == ",":
            self.take(",")
            if self.peek() == "]":
                break
            values.append(self.number())
        self.take("]")
        if self.peek() == "*":
            self.take("*")
            raw = self.take("number")
            if not raw.isdigit():
                raise self.error(f"repeat count {raw!r} is not a whole number")
            count = int(raw)
            self.check_length(len(values) * count)
            values = values * count
        return values

    def check_length(self, length: int) -> None:
        if length > MAX_ENTRIES:
            raise self.error(f"it has {length} entries, more than the limit of {MAX_ENTRIES}")


def parse_compress_rate(value: str | Sequence[float] | None) -> list[float]:
    """Rates from the string grammar, or a list of numbers; each checked in [0, 1)."""
    if value is None:
        return []
    if isinstance(value, str):
        rates = _Parser(value).parse()
    elif isinstance(value, Sequence):
        if len(value) > MAX_ENTRIES:
            raise NortonError(f"compress rate has {len(value)} entries, more than the limit of {MAX_ENTRIES}")
        rates = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise NortonError(f"compress rate entries must be numbers, got {v!r}")
            rates.append(float(v))
    else:
        raise NortonError(
            f"compress rate must be a string like \"[0.1]*3\" or a list of numbers, got {type(value).__name__}"
        )
    for i, rate in enumerate(rates):
        if not 0.0 <= rate < 1.0:  # also rejects NaN
            raise NortonError(f"compress rate entry {i} is {rate!r}; every rate must be in [0, 1)")
    return rates


def fit_compress_rate(value: str | Sequence[float] | None, length: int, arch: str) -> list[float]:
    """Rates for an architecture with ``length`` entries, following the published
    configs' looseness: trailing extra entries are accepted when all zero; a
    shorter list is padded with zeros, with a warning saying how many layers stay
    unpruned.  ``None`` means no pruning."""
    rates = parse_compress_rate(value)
    if len(rates) > length:
        extra = rates[length:]
        bad = next((i for i, r in enumerate(extra, start=length) if r != 0.0), None)
        if bad is not None:
            raise NortonError(
                f"compress rate for {arch} has {len(rates)} entries but {arch} takes {length}; "
                f"extra entries must be 0, entry {bad} is {rates[bad]!r}"
            )
        rates = rates[:length]
    elif 0 < len(rates) < length:
        warnings.warn(
            f"compress rate for {arch} has {len(rates)} of {length} entries; "
            f"the last {length - len(rates)} are taken as 0 (unpruned)",
            stacklevel=2,
        )
    return rates + [0.0] * (length - len(rates))


def format_compress_rate(rates: Sequence[float]) -> str:
    """The shortest run-length string form, e.g. ``[0.0]+[0.1]*2``."""
    parts: list[str] = []
    i = 0
    while i < len(rates):
        j = i
        while j < len(rates) and rates[j] == rates[i]:
            j += 1
        count = j - i
        parts.append(f"[{rates[i]!r}]" + (f"*{count}" if count > 1 else ""))
        i = j
    return "+".join(parts)
