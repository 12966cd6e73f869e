"""The one way ditplan reads a user's file and writes one of its own.

Reading: UTF-8 text (a byte-order mark is dropped; any other encoding is refused by name), YAML
mappings without duplicate keys, JSON without NaN or infinity, CSV rows with exactly the header's
fields. Writing: the destination is checked before any work is done (`check_output`), and the file
appears whole or not at all (`write_atomically`), keeping the mode of a file it replaces.

Every failure is a DitplanError that names the file and the rule, never a traceback.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from costmodel.errors import DitplanError

UTF8_BOM = "\ufeff"


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of `path`, decoded as UTF-8 with or without a byte-order mark."""
    path = Path(path)
    if path.is_dir():
        raise DitplanError(f"{what} {path}: it is a folder; give the path of a file.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DitplanError(f"{what} {path}: cannot read it ({error.strerror}).") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DitplanError(
            f"{what} {path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8.") from None
    if "\x00" in text:
        raise DitplanError(f"{what} {path}: it holds NUL bytes; a text file is expected.")
    return text.removeprefix(UTF8_BOM)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key (a list as key): PyYAML names it below
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (the second would silently win)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def read_yaml(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """One YAML mapping; a syntax error, a duplicate key or a non-mapping is a DitplanError."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise DitplanError(f"{path}: malformed YAML{at}: {problem}.") from None
    except RecursionError:
        raise DitplanError(f"{path}: the YAML is nested too deeply to be a profile.") from None
    if not isinstance(data, dict):
        raise DitplanError(f"{path}: the file must hold a YAML mapping (key: value lines), not {type(data).__name__}.")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """One JSON document; NaN and Infinity (which Python would accept) are refused."""
    text = read_text(path, what)
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise DitplanError(f"{what} {path}: not valid JSON ({error.msg} at line {error.lineno}).") from None
    except ValueError as error:
        raise DitplanError(f"{what} {path}: not valid JSON ({error}).") from None
    except RecursionError:
        raise DitplanError(f"{what} {path}: the JSON is nested too deeply.") from None


def read_csv(path: str | os.PathLike, what: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV file with a header holding every name in `columns` (others are kept).

    A row with more fields than the header, or a header named twice, is refused with its line.
    """
    text = read_text(path, what)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in columns if name not in header]
        if missing:
            raise DitplanError(f"{what} {path}: missing column {missing[0]!r}; the columns are {', '.join(columns)}.")
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise DitplanError(f"{what} {path}: column {twice[0]!r} is named twice in the header.")
        rows = []
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue  # blank line
            if len(fields) > len(header):
                raise DitplanError(f"{what} {path}: line {reader.line_num} has {len(fields)} fields but the header "
                                   f"names {len(header)}; quote a field that holds a comma.")
            rows.append(dict(zip(header, [*fields, *[""] * (len(header) - len(fields))])))
    except csv.Error as error:
        raise DitplanError(f"{what} {path}: malformed CSV at line {reader.line_num} ({error}).") from None
    return rows


def check_output(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, a file destination the result could not be written to: a folder, a
    read-only file, or a place whose nearest existing folder cannot be written."""
    target = Path(path)
    if str(path) == "" or target.is_dir():
        raise DitplanError(f"{flag} {path!s}: it is a folder; give the path of the file to write.")
    if target.exists() and (not os.access(target, os.W_OK) or not target.stat().st_mode & 0o222):
        raise DitplanError(f"{flag} {path}: the file is read-only; it would not be replaced.")
    _check_creatable(target, flag)
    return target


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output folder that is a file or could not be created or written."""
    target = Path(path)
    if str(path) == "":
        raise DitplanError(f"{flag}: empty; give the folder to write into.")
    if target.exists() and not target.is_dir():
        raise DitplanError(f"{flag} {path}: it is a file, not a folder.")
    _check_creatable(target, flag)
    return target


def _check_creatable(target: Path, flag: str) -> None:
    """`target` can be created (or replaced) under its nearest existing folder: a probe file is
    created and removed there (permission bits alone do not tell, e.g. for root or /proc)."""
    folder = next((parent for parent in target.absolute().parents if parent.exists()), None)
    if folder is None or not folder.is_dir():
        raise DitplanError(f"{flag} {target}: {folder} is a file, so nothing can be created under it.")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".ditplan-probe-"):
            pass
    except OSError as error:
        raise DitplanError(f"{flag} {target}: cannot write into {folder} ({error.strerror}).") from None


def write_atomically(path: str | os.PathLike, text: str, flag: str) -> Path:
    """Write `text` to `path` whole or not at all; a replaced file keeps its permissions."""
    target = check_output(path, flag)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise DitplanError(f"{flag} {path}: cannot write there ({error.strerror}).") from None
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temp, replacement_mode(target))
        os.replace(temp, target)
    except OSError as error:
        raise DitplanError(f"{flag} {path}: cannot write there ({error.strerror}).") from None
    finally:
        temp.unlink(missing_ok=True)
    return target


def replacement_mode(target: Path) -> int:
    """The replaced file's mode, or an ordinary file's (mkstemp makes a private one)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
