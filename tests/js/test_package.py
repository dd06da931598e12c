"""The JavaScript client ships twice from one file: in the Python package (the server
serves shardchat/static/shardchat.js at /shardchat.js) and as the npm package in
clients/js, whose ``npm pack`` copies that same file in; its types name every export."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

from tests.js.nodetools import HERE, install_ws, run_npm

ROOT = Path(__file__).resolve().parent.parent.parent
MODULE = ROOT / "shardchat" / "static" / "shardchat.js"
PACKAGE = ROOT / "clients" / "js"


def test_npm_pack_ships_the_module_the_server_serves() -> None:
    done = run_npm(["pack", "--dry-run", "--json"], PACKAGE)
    assert done.returncode == 0, done.stderr
    (packed,) = json.loads(done.stdout)
    files = {entry["path"]: entry["size"] for entry in packed["files"]}
    assert set(files) == {"package.json", "README.md", "shardchat.d.ts", "shardchat.js"}
    assert files["shardchat.js"] == MODULE.stat().st_size
    # After packing, the folder's module is the link to the served file again.
    link = PACKAGE / "shardchat.js"
    assert link.is_symlink() and link.resolve() == MODULE.resolve()
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert manifest["type"] == "module" and not manifest.get("dependencies")


def test_the_wheel_carries_the_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "static/*.js" in project["tool"]["setuptools"]["package-data"]["shardchat"]


def test_the_types_declare_every_export() -> None:
    source = MODULE.read_text()
    types = (PACKAGE / "shardchat.d.ts").read_text()
    exported = set(re.findall(r"^export (?:class|const|function) (\w+)", source, re.M))
    declared = set(re.findall(r"^export declare (?:class|const|function) (\w+)", types, re.M))
    assert exported == declared
    assert "export default ChatClient;" in source and "export default ChatClient;" in types


def test_the_types_type_an_application_and_reject_misuse() -> None:
    """tsc --strict compiles tests/js/types.check.ts against shardchat.d.ts; its
    @ts-expect-error lines fail the build if the misuse they mark were accepted."""
    install_ws()
    tsc = HERE / "node_modules" / ".bin" / "tsc"
    done = subprocess.run(
        [
            str(tsc),
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--lib",
            "es2022,dom",
            "types.check.ts",
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
