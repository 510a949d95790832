"""The command line: a thin layer that parses argv into typed configs and calls library functions."""

from nanoseek.cli.main import main

__all__ = ["main"]
