"""npm for the JavaScript tests: run it, and install the tests' own dependencies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent


def run_npm(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    npm = shutil.which("npm")
    assert npm is not None, "npm is missing: run scripts/system-deps.sh"
    return subprocess.run(
        [npm, *args, "--loglevel=error"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def install_ws() -> None:
    """``npm ci`` tests/js's dependencies (ws, typescript) when missing or out of date."""
    lock = HERE / "package-lock.json"
    stamp = HERE / "node_modules" / ".package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = run_npm(["ci", "--no-audit", "--no-fund"], HERE)
    assert done.returncode == 0, done.stdout + done.stderr
