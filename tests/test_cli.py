"""The command-line contract from DESIGN.md: subcommands, exit statuses, no tracebacks."""

from __future__ import annotations

import subprocess
import sys

from unsloth_nb.__main__ import COMMANDS

CONTRACT = ["plan", "train", "merge", "gguf", "serve", "demo"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unsloth_nb", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand_of_the_contract() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in CONTRACT:
        assert command in result.stdout
    assert set(CONTRACT) <= set(COMMANDS)


def test_no_subcommand_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage" in result.stdout.lower()


def test_unknown_option_is_a_usage_error() -> None:
    result = run("gguf", "--no-such-option")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_each_subcommand_has_help() -> None:
    for command in CONTRACT:
        result = run(command, "--help")
        assert result.returncode == 0, command
        assert command in result.stdout
