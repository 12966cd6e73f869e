"""The repository explains itself: no file points outside it or to the project's tracker.

Someone who clones the project has only the repository: a path above it, a tracker's issue number
or a tracker phrase in code, docs or tests means nothing to them. The project's own `docs/` is
where such explanations live.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", ".venv", ".hypothesis", ".pytest_cache", "__pycache__", "build", "dist"}

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = {
    "a path above the repository": re.compile(r"\.\./" + "shared"),
    "the steering documents": re.compile(r"\b(" + "DESIGN" + "|" + "MECHANICS" + r")\.md\b"),
    "an issue number": re.compile(r"\b" + "[Ii]ssue" + r"s?\s*#?\s*\d+"),
    "a tracker phrase": re.compile("must" + r"[\s_-]*" + "show", re.IGNORECASE),
}


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git's view), else every file outside SKIPPED_DIRS."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
        return [ROOT / name for name in listed if (ROOT / name).is_file()]
    except (OSError, subprocess.SubprocessError):
        return [path for path in ROOT.rglob("*")
                if path.is_file() and not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts)]


def test_the_pattern_catches_what_it_should():
    for text in ("see " + "../" + "shared/x", "DESIGN" + ".md", "(issue" + " 5)", "Must" + " show 1", "MUST" + "_SHOW"):
        assert any(pattern.search(text) for pattern in FORBIDDEN.values()), text
    for text in ("an issue with the link", "shows", "design of the model"):
        assert not any(pattern.search(text) for pattern in FORBIDDEN.values()), text


def test_no_file_points_outside_the_repository_or_to_the_tracker():
    found = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (PNG results) carry no prose
        for what, pattern in FORBIDDEN.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {what} ({match.group(0)!r})")
    assert not found, "\n".join(found)
