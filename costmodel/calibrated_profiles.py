"""Writing calibrated constants: a user's cluster file, or the built-in hardware and cluster profiles.

Values keep three significant digits. Every file records where its fitted values came from (the
command and the date) and its datasheet-based priors in a `calibration:` section, from which the
next calibration starts again. Built-in files are edited line by line so their comments and
sources survive.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from costmodel.calibration import Calibration, Parameter
from costmodel.errors import DitplanError
from costmodel.topology import CLUSTERS_DIR, HARDWARE_DIR, Cluster


def rounded(value: float) -> float:
    return float(f"{value:.3g}")


def _number(value: float) -> str:
    return f"{rounded(value):g}"


def _priors_of(parameters: list[Parameter]) -> dict[str, Any]:
    """The priors as the nested `prior:` mapping (links under `links: {tier: {field: value}}`)."""
    out: dict[str, Any] = {}
    for parameter in parameters:
        if "." in parameter.name:
            tier, name = parameter.name.split(".")
            out.setdefault("links", {}).setdefault(tier, {})[name] = rounded(parameter.prior)
        else:
            out[parameter.name] = rounded(parameter.prior)
    return out


def _calibration_section(source: str, parameters: list[Parameter]) -> str:
    """The YAML text of a `calibration:` section (flow mappings, so it reads as one block)."""
    prior = _priors_of(parameters)
    lines = ["calibration:", f"  source: {yaml.safe_dump(source, width=10**6, default_style=chr(34)).strip()}", "  prior:"]
    for key, value in prior.items():
        if key == "links":
            lines.append("    links:")
            for tier, fields in value.items():
                lines.append(f"      {tier}: {{{', '.join(f'{k}: {_number(v)}' for k, v in fields.items())}}}")
        else:
            lines.append(f"    {key}: {_number(value)}")
    return "\n".join(lines) + "\n"


def _set_top_level(text: str, key: str, value: float, where: Path) -> str:
    pattern = re.compile(rf"^(\s*{re.escape(key)}:\s*)([-+0-9.eE]+)", re.MULTILINE)
    if not pattern.search(text):
        raise DitplanError(f"{where}: no '{key}:' line to update.")
    return pattern.sub(lambda m: m.group(1) + _number(value), text, count=1)


def _set_link_field(text: str, tier: str, key: str, value: float, where: Path) -> str:
    """Inside the one-line flow mapping of `tier:`, set `key:`."""
    line_pattern = re.compile(rf"^(\s*{tier}:\s*\{{.*)$", re.MULTILINE)
    match = line_pattern.search(text)
    if match is None:
        raise DitplanError(f"{where}: no one-line '{tier}: {{...}}' link to update.")
    line = match.group(1)
    field = re.compile(rf"(?<![a-z_]){re.escape(key)}:\s*[-+0-9.eE]+")
    if field.search(line):
        new_line = field.sub(f"{key}: {_number(value)}", line, count=1)
    else:
        new_line = line.replace("{", f"{{{key}: {_number(value)}, ", 1)
    return text[:match.start(1)] + new_line + text[match.end(1):]


def _replace_section(text: str, section: str) -> str:
    """Put `section` (a top-level `calibration:` block) at the end, replacing an earlier one."""
    text = re.sub(r"^calibration:\n(?:[ \t]+.*\n?)*", "", text, flags=re.MULTILINE)
    return text.rstrip("\n") + "\n" + section


def write_builtin(calibration: Calibration, source: str) -> list[Path]:
    """Update the built-in hardware and cluster files the calibration covers; returns the files written."""
    written: list[Path] = []
    by_scope: dict[str, list[Parameter]] = {}
    for parameter in calibration.parameters:
        by_scope.setdefault(parameter.scope, []).append(parameter)
    for scope, parameters in by_scope.items():
        path = HARDWARE_DIR / f"{scope}.yaml"
        if not path.is_file():
            path = CLUSTERS_DIR / f"{scope}.yaml"
        text = path.read_text()
        for parameter in parameters:
            if "." in parameter.name:
                tier, name = parameter.name.split(".")
                text = _set_link_field(text, tier, name, parameter.value, path)
            else:
                text = _set_top_level(text, parameter.name, parameter.value, path)
        path.write_text(_replace_section(text, _calibration_section(source, parameters)))
        written.append(path)
    return written


def cluster_document(calibration: Calibration, cluster: Cluster, source: str) -> dict[str, Any]:
    """A whole cluster file (hardware inline) with the fitted constants of `cluster`."""
    from costmodel import strict

    data = strict.read_yaml(Path(cluster.path))
    hardware = data["hardware"] if isinstance(data["hardware"], dict) else strict.read_yaml(HARDWARE_DIR / f"{data['hardware']}.yaml")
    hardware = {key: value for key, value in hardware.items() if key != "calibration"}
    data = {key: value for key, value in data.items() if key != "calibration"}
    data["hardware"] = hardware
    ours = [p for p in calibration.parameters if p.scope in (cluster.id, cluster.hardware.id)]
    for parameter in ours:
        if parameter.scope == cluster.hardware.id:
            hardware[parameter.name] = rounded(parameter.value)
        elif "." in parameter.name:
            tier, name = parameter.name.split(".")
            links = data["network"] if tier == "network" else data["node"]["links"][tier]
            links[name] = rounded(parameter.value)
        else:
            data["node"][parameter.name] = rounded(parameter.value)
    gpu = [p for p in ours if p.scope == cluster.hardware.id]
    own = [p for p in ours if p.scope == cluster.id]
    if gpu:
        hardware["calibration"] = {"source": source, "prior": _priors_of(gpu)}
    if own:
        data["calibration"] = {"source": source, "prior": _priors_of(own)}
    data["source"] = source
    return data


def write_cluster_file(calibration: Calibration, cluster: Cluster, out: Path, source: str) -> None:
    document = cluster_document(calibration, cluster, source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(document, sort_keys=False, width=120))
    except OSError as error:
        raise DitplanError(f"--out {out}: cannot write the cluster file ({error.strerror}).") from None
