"""``python -m shardchat``: the same command line as the ``shardchat`` script."""

from shardchat.cli import main

main(prog_name="shardchat")
