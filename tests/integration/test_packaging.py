"""The command line lives in the package: the console script, ``python -m
shardchat`` and the top-level ``cli.py`` shim all run ``shardchat.cli:main``,
and an install puts no top-level ``cli`` module into site-packages."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_console_script_points_into_the_package() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "shardchat"]
    assert script.value == "shardchat.cli:main"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "py-modules" not in setuptools  # no top-level cli module is installed
    assert setuptools["packages"]["find"]["include"] == ["shardchat*"]


def test_python_m_shardchat_and_the_shim_run_the_same_command_line() -> None:
    for args in (["-m", "shardchat"], [str(ROOT / "cli.py")]):
        out = subprocess.run(
            [sys.executable, *args, "--help"], capture_output=True, text=True, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("Usage: shardchat ")


def test_the_readme_imports_work() -> None:
    """The names the README imports are where it says, in a fresh interpreter."""
    code = (
        "from shardchat.client import ChatClient, ChatError, Closed, Refused, Unavailable\n"
        "from shardchat.auth import make_token\n"
        "from shardchat.hooks import ConnectInfo, ConnInfo, Reject\n"
    )
    readme = (ROOT / "README.md").read_text()
    assert "from shardchat.client import ChatClient" in readme
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
