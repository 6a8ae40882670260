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
    """'entropy:B' | 'confidence:T' | 'quota:K' | 'linear-quota' -> an AcceptRule (dgemma.sampling).

    Shared by the CLI's --accept and the server's "acceptance" field; raises ValueError with a clear message.
    linear-quota needs the step count: with num_steps None the string "linear-quota" is returned for the caller
    to resolve once the step count is known."""
    from . import sampling

    name, _, arg = text.partition(":")
    parse = {"entropy": (float, 0.1, sampling.entropy_bound),
             "confidence": (float, 0.9, sampling.confidence_threshold),
             "quota": (int, 8, sampling.quota)}
    if name in parse:
        kind, default, make = parse[name]
        try:
            value = kind(arg) if arg else default
        except ValueError:
            raise ValueError(f"acceptance rule {text!r}: {arg!r} is not a {kind.__name__}") from None
        return make(value)
    if name == "linear-quota" and not arg:
        return "linear-quota" if num_steps is None else sampling.linear_quota(num_steps)
    raise ValueError(f"unknown acceptance rule {text!r}; use entropy:B, confidence:T, quota:K or linear-quota")
