"""The checks every number entering the library goes through: configs, regularizers, plan files, the CLI, ledgers.

One place, so that every entry point refuses the same things: booleans posing as numbers, strings, values out of
range and non-finite floats (NaN, +-Inf, and integers too large for a float).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
# Upper bound of step counts (training steps, sampler steps, batch sizes): generous, but a typo such as 10**12 is
# refused at once rather than running for ever or overflowing later.
MAX_STEPS = 1_000_000
MAX_RANK = 65_536  # LoRA rank of one layer (configs and ledgers alike)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in [minimum, maximum]; else ValueError naming ``name``.

    Args:
        value: the value to check.
        name: how the message names it (a field, a flag, a plan key).
        minimum: the smallest value allowed (None: no bound).
        maximum: the largest value allowed (None: no bound).

    Returns:
        ``value`` itself.

    Raises:
        ValueError: a bool, a non-integer or a value out of range; the message names ``name`` and the range.

    Examples:
        >>> check_int(3, "steps", minimum=1)
        3
        >>> check_int(True, "steps", minimum=1)
        Traceback (most recent call last):
        ValueError: steps must be an integer >= 1, got True
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not _in_range(
        value, minimum, maximum, False, False
    ):
        bounds = _bounds(minimum, maximum, False, False)
        raise ValueError(f"{name} must be an integer{' ' + bounds if bounds else ''}, got {value!r}")
    return value


def check_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` if it is a finite real number (not a bool) within the bounds; else ValueError naming ``name``.

    The message reads "``name`` must be a number >= 0" (one bound) or "``name`` must be in (0, 1]" (two bounds).

    Args:
        value: the value to check.
        name: how the message names it.
        minimum: the lower bound (None: none).
        maximum: the upper bound (None: none).
        exclusive_minimum: the lower bound itself is refused.
        exclusive_maximum: the upper bound itself is refused.

    Returns:
        ``value`` itself.

    Raises:
        ValueError: a bool, a non-number, NaN, an infinity (or an int too large for a float) or a value out of
            range.

    Examples:
        >>> check_number(float("nan"), "top_k", minimum=0, maximum=1, exclusive_minimum=True)
        Traceback (most recent call last):
        ValueError: top_k must be in (0, 1], got nan (not a finite number)
    """
    bounds = _bounds(minimum, maximum, exclusive_minimum, exclusive_maximum)
    wanted = bounds if minimum is not None and maximum is not None else f"a number{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be {wanted}, got {value!r} (not a finite number)")
    if not _in_range(float(value), minimum, maximum, exclusive_minimum, exclusive_maximum):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def check_count(value: Any, name: str, *, minimum: int = 1, maximum: int = MAX_STEPS) -> int:
    """A count (steps, batch size, rank): an integer >= ``minimum``, at most ``maximum`` (default ``MAX_STEPS``)."""
    check_int(value, name, minimum=minimum)
    if value > maximum:
        raise ValueError(f"{name} must be an integer >= {minimum} (at most {maximum}), got {value!r}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    """A random seed: an integer >= 0 (at most 2**63 - 1, what torch's generators take)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name} must be an integer >= 0 (at most 2**63 - 1), got {value!r}")
    return value


def check_optional_number(value: Any, name: str, **bounds: Any) -> float | None:
    """``None`` or a number as ``check_number`` accepts it."""
    return None if value is None else check_number(value, name, **bounds)


def check_repo_id(value: Any, name: str = "repo_id") -> str:
    """A Hub model id, "name" or "namespace/name", checked by ``huggingface_hub.utils.validate_repo_id`` (which also
    refuses "..", "--" and more than one "/"). A non-string is a TypeError, anything else wrong a ValueError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    wanted = f"{name} must be a Hub model id like 'user/model' ('name' or 'namespace/name')"
    if not isinstance(value, str):
        raise TypeError(f"{wanted}, got {value!r}")
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ValueError(f"invalid {name} {value!r}: {wanted}; {' '.join(str(err).split())}") from None
    return value


def is_repo_id(value: Any) -> bool:
    """True for "namespace/name" strings that ``check_repo_id`` accepts and that are not a local path."""
    try:
        check_repo_id(value)
    except (TypeError, ValueError):
        return False
    return value.count("/") == 1 and not os.path.exists(value)


def finite_json_float(text: str) -> float:
    """``json.loads(parse_float=...)``: a float that overflows to inf (``1e400``) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is too large for a float")
    return value


def refuse_json_constant(name: str) -> Any:
    """``json.loads(parse_constant=...)``: NaN, Infinity and -Infinity are not JSON and are refused."""
    raise ValueError(f"{name} is not allowed (non-finite numbers are refused)")


__all__ = ["MAX_RANK", "MAX_STEPS", "SEED_MAX", "check_count", "check_int", "check_number", "check_optional_number", "check_repo_id",
           "check_seed", "finite_json_float", "is_repo_id", "refuse_json_constant"]
