"""Example shardchat apps, loaded with ``shardchat start --app examples.NAME:app``."""
