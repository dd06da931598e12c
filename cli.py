"""The design card's top-level ``cli.py``: a shim over :mod:`shardchat.cli`.

Installed, the ``shardchat`` script and ``python -m shardchat`` run
:func:`shardchat.cli.main`; this file only serves a checkout (``python cli.py``).
"""

from shardchat.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main(prog_name="shardchat")
