"""The package version, in a module of its own: the modules that write it (ledger records, saved folders, model
cards) import it from here, not from the package root, and pyproject.toml reads it from here too."""

__version__ = "0.1.0"
"""The package's version (PEP 440): recorded in every ledger record, saved folder and model card."""
