"""Strict reading of profile YAML files: every key known, every field present, every figure sane.

Each helper takes a `where` string ("profiles/hardware/l40.yaml: links.socket") so an error names
the file, the key and the rule in one sentence.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from costmodel.errors import DitplanError
from costmodel.files import read_yaml

# The finite-number rule. A figure loaded from a file lies within these magnitudes, so that the
# cost model's products and quotients of a few figures stay finite; every computed figure that
# leaves the program is checked again (`require_finite`).
LARGEST_FIGURE = 1e15
SMALLEST_FIGURE = 1e-15
LARGEST_INTEGER = 2**31 - 1

__all__ = ["read_yaml", "profile_path", "check_keys", "number", "integer", "boolean", "text", "sequence",
           "require_finite"]


def profile_path(name_or_path: str, folder: Path, kind: str, known: Callable[[], list[str]]) -> Path:
    """A built-in profile id (`folder/<id>.yaml`) or a path to a YAML file of that `kind` ("model",
    "cluster"); an unknown id lists the built-in ones (`known()`, called only then)."""
    if not name_or_path.strip():
        raise DitplanError(f"{kind} {name_or_path!r}: empty; give a {kind} id (see `ditplan {kind}s`) or a YAML path.")
    candidate = Path(name_or_path)
    if candidate.is_dir():
        raise DitplanError(f"{kind} {name_or_path!r} is a folder; give a {kind} id or the path of a {kind} YAML file.")
    if candidate.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not candidate.is_file():
            raise DitplanError(f"{kind} file {name_or_path!r} does not exist.")
        return candidate
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        raise DitplanError(
            f"unknown {kind} {name_or_path!r}; the built-in {kind}s are {', '.join(known())} "
            f"(or give a path to a {kind} YAML)."
        )
    return path


def check_keys(data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """`data` must be a mapping with every `required` key and nothing outside required + optional."""
    if not isinstance(data, dict):
        raise DitplanError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}.")
    unknown = [key for key in data if key not in required and key not in optional]
    if unknown:
        allowed = ", ".join((*required, *optional))
        raise DitplanError(f"{where}: unknown key {unknown[0]!r}; the allowed keys are {allowed}.")
    missing = [key for key in required if key not in data]
    if missing:
        raise DitplanError(f"{where}: missing field {missing[0]!r}; it is required.")
    return data


def number(data: dict[str, Any], key: str, where: str, *, positive: bool = True, allow_zero: bool = False,
           maximum: float | None = None, default: float | None = None) -> float:
    """A real number; by default strictly positive (a zero or negative bandwidth, size or count fails)."""
    if key not in data:
        if default is None:
            raise DitplanError(f"{where}: missing field {key!r}; it is required.")
        return default
    value = data[key]
    if isinstance(value, str):
        # YAML 1.1 (PyYAML) reads exponent forms without a sign, such as 4.76e9, as strings.
        try:
            value = float(value)
        except ValueError:
            raise DitplanError(f"{where}.{key}: {value!r} is not a number.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DitplanError(f"{where}.{key}: {value!r} is not a number.")
    try:
        value = float(value)
    except OverflowError:
        raise DitplanError(f"{where}.{key}: {value!r} is not a finite number.") from None
    if not math.isfinite(value):
        raise DitplanError(f"{where}.{key}: {value!r} is not a finite number.")
    if abs(value) > LARGEST_FIGURE or (value != 0 and abs(value) < SMALLEST_FIGURE):
        raise DitplanError(f"{where}.{key}: {value!r} is out of range; a figure's magnitude lies between "
                           f"{SMALLEST_FIGURE:g} and {LARGEST_FIGURE:g} (or is 0 where zero is allowed).")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        rule = "must be >= 0" if allow_zero else "must be > 0"
        raise DitplanError(f"{where}.{key}: {value!r} is not allowed; it {rule}.")
    if maximum is not None and value > maximum:
        raise DitplanError(f"{where}.{key}: {value!r} is not allowed; it must be <= {maximum}.")
    return value


def integer(data: dict[str, Any], key: str, where: str, *, minimum: int = 1, maximum: int = LARGEST_INTEGER,
            default: int | None = None) -> int:
    if key not in data:
        if default is None:
            raise DitplanError(f"{where}: missing field {key!r}; it is required.")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DitplanError(f"{where}.{key}: {value!r} is not an integer.")
    if value < minimum:
        raise DitplanError(f"{where}.{key}: {value} is not allowed; it must be >= {minimum}.")
    if value > maximum:
        raise DitplanError(f"{where}.{key}: {value} is not allowed; it must be <= {maximum}.")
    return value


def boolean(data: dict[str, Any], key: str, where: str, *, default: bool | None = None) -> bool:
    if key not in data:
        if default is None:
            raise DitplanError(f"{where}: missing field {key!r}; it is required.")
        return default
    value = data[key]
    if not isinstance(value, bool):
        raise DitplanError(f"{where}.{key}: {value!r} is not true or false.")
    return value


def text(data: dict[str, Any], key: str, where: str, *, default: str | None = None,
         choices: tuple[str, ...] | None = None) -> str:
    if key not in data:
        if default is None:
            raise DitplanError(f"{where}: missing field {key!r}; it is required.")
        return default
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise DitplanError(f"{where}.{key}: {value!r} is not a non-empty string.")
    if choices is not None and value not in choices:
        raise DitplanError(f"{where}.{key}: {value!r} is not allowed; it must be one of {', '.join(choices)}.")
    return value


def sequence(data: dict[str, Any], key: str, where: str, *, default: list | None = None) -> list[Any]:
    if key not in data:
        if default is None:
            raise DitplanError(f"{where}: missing field {key!r}; it is required.")
        return default
    value = data[key]
    if not isinstance(value, list) or not value:
        raise DitplanError(f"{where}.{key}: expected a non-empty list, got {value!r}.")
    return value


def require_finite(value: Any, where: str, path: str = "") -> None:
    """Every float in `value` (a number, or mappings and sequences of them) must be finite: a NaN or
    infinite computed figure means the inputs lie outside the range the cost model computes in."""
    if isinstance(value, float):
        if not math.isfinite(value):
            named = f" {path}" if path else ""
            raise DitplanError(
                f"{where}: the computed figure{named} is {value}; the model's or cluster's figures are too extreme "
                "for the cost model (check the profile's values).")
    elif isinstance(value, dict):
        for key, item in value.items():
            require_finite(item, where, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            require_finite(item, where, f"{path}[{index}]")
