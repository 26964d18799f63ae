"""Shared pieces of llmfleet: the wire protocol, names, errors, config and the CLI."""

__version__ = "0.1.0"
