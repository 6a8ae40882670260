"""Value parsers shared by every command's flags and the server's request fields (clear messages for bad values)."""

from __future__ import annotations

import argparse


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def port(text: str) -> int:
    value = _int_at_least(text, 1)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value}")
    return value


def accept_rule(text: str, num_steps: int | None = None):
    """--accept / "acceptance": 'entropy:B' | 'confidence:T' | 'quota:K' | 'linear-quota' -> an AcceptRule
    (dgemma.sampling.parse_accept, which says how)."""
    from .sampling import parse_accept

    return parse_accept(text, num_steps)
