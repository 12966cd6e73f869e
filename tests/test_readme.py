"""Every command and snippet of README.md runs as written (heavy ones in a cheaper form, named below)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main as ditplan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Set-up steps a test cannot repeat (they install the project) and the test command itself.
NOT_RUN = ("python3 -m venv .venv", ". .venv/bin/activate", "pip install torch==2.13.0", 'pip install -e ".[test]"',
           ".venv/bin/python -m pytest -q")


def blocks(language: str) -> list[str]:
    """The fenced blocks opened with ```<language> (an empty language: plain ``` blocks)."""
    found, current, opened = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if opened is None:
                opened, current = line[3:].strip(), []
            else:
                if opened == language:
                    found.append("\n".join(current) + "\n")
                opened = None
        elif opened is not None:
            current.append(line)
    return found


def shell_commands() -> list[str]:
    """`$ ditplan ...` lines of the output examples, and the steps of the bash blocks."""
    commands = [line[2:] for block in blocks("") for line in block.splitlines() if line.startswith("$ ")]
    for block in blocks("bash"):
        for line in block.strip().splitlines():
            commands += [step.strip() for step in line.split("&&")]
    return commands


def several_machine_commands() -> list[str]:
    """The `ditplan` commands of the ```sh blocks (several machines): continuation lines joined, the
    comments beside them dropped. They need several machines, so they are parsed, not run; the
    two-namespace tests under tests/executor/multinode run the same flags for real."""
    commands = []
    for block in blocks("sh"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("ditplan "):
                commands.append(line)
    return commands


def test_the_readme_names_what_these_tests_run():
    commands = shell_commands()
    assert all(command.startswith("ditplan ") or command in NOT_RUN for command in commands), commands
    assert sum(command.startswith("ditplan run") for command in commands) == 1
    assert len(blocks("python")) == 1


@pytest.mark.parametrize("command", [c for c in shell_commands() if c.startswith("ditplan ") and
                                     not c.startswith("ditplan run")])
def test_each_planner_command_runs(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # `--out plan.json` lands here
    assert ditplan(shlex.split(command)[1:]) == 0
    out, err = capsys.readouterr()
    assert out and "Traceback" not in err


@pytest.mark.timeout(300)
def test_the_run_example_runs(tmp_path):
    command = next(c for c in shell_commands() if c.startswith("ditplan run"))
    result = subprocess.run([sys.executable, "-m", "planner", *shlex.split(command)[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "fox" / "run.json").is_file() and (tmp_path / "out" / "fox" / "image-000.png").is_file()


@pytest.mark.timeout(400)
def test_the_python_snippet_runs_on_every_rank(tmp_path):
    """Under torchrun with 2 ranks. Cheaper form: `path` is a saved tiny PixArt-alpha pipeline, and the
    image is 256x256 in 4 steps instead of 1024x1024 in 20."""
    from executor.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("tiny-pixart-alpha", tmp_path / "pipeline")
    snippet = blocks("python")[0]
    cheap = snippet.replace("height=1024, width=1024, num_inference_steps=20", "height=256, width=256, num_inference_steps=4")
    assert cheap != snippet
    script = tmp_path / "snippet.py"
    script.write_text(f"path = {str(folder)!r}\n{cheap}")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=380,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fox.png").is_file()


def test_the_several_machine_commands_parse():
    from executor.launch import build_parser as run_parser
    from planner.cli import build_parser

    commands = several_machine_commands()
    assert {shlex.split(c)[1] for c in commands} >= {"run", "search", "profile"}, commands
    for command in commands:
        words = shlex.split(command)[1:]
        if words[0] == "run":
            args = run_parser().parse_args(words[1:])
            assert args.nnodes == 2 and args.rdzv_endpoint, command
        else:
            build_parser(only=words[0]).parse_args(words)
