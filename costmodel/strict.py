"""Strict reading of profile YAML files: every key known, every field present, every figure sane.

Each helper takes a `where` string ("profiles/hardware/l40.yaml: links.socket") so an error names
the file, the key and the rule in one sentence.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from costmodel.errors import DitplanError


def profile_path(name_or_path: str, folder: Path, kind: str, known: Callable[[], list[str]]) -> Path:
    """A built-in profile id (`folder/<id>.yaml`) or a path to a YAML file of that `kind` ("model",
    "cluster"); an unknown id lists the built-in ones (`known()`, called only then)."""
    candidate = Path(name_or_path)
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


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML mapping; a missing file, a syntax error or a non-mapping is a DitplanError."""
    try:
        text = path.read_text()
    except OSError as error:
        raise DitplanError(f"{path}: cannot read the file ({error.strerror}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise DitplanError(f"{path}: malformed YAML{at}: {problem}.") from None
    if not isinstance(data, dict):
        raise DitplanError(f"{path}: the file must hold a YAML mapping (key: value lines), not {type(data).__name__}.")
    return data


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
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise DitplanError(f"{where}.{key}: {value!r} is not a finite number.")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        rule = "must be >= 0" if allow_zero else "must be > 0"
        raise DitplanError(f"{where}.{key}: {value!r} is not allowed; it {rule}.")
    if maximum is not None and value > maximum:
        raise DitplanError(f"{where}.{key}: {value!r} is not allowed; it must be <= {maximum}.")
    return value


def integer(data: dict[str, Any], key: str, where: str, *, minimum: int = 1, default: int | None = None) -> int:
    if key not in data:
        if default is None:
            raise DitplanError(f"{where}: missing field {key!r}; it is required.")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DitplanError(f"{where}.{key}: {value!r} is not an integer.")
    if value < minimum:
        raise DitplanError(f"{where}.{key}: {value} is not allowed; it must be >= {minimum}.")
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
