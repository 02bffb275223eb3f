"""The ``embedkit`` command line: ``app.py`` assembles one module per command group; ``common.py`` holds the one
error contract. The top layer of the package: it may import every other layer, and none imports it."""

from embedkit.cli.app import app

__all__ = ["app"]
