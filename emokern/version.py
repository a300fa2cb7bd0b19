"""The package version, in one place (the package metadata and saved files read it). Tested
through the metadata it stamps, in ``tests/test_bankfile.py``."""

__version__ = "0.1.0"
