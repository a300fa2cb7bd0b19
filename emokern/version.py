"""The package version, in one place (the package metadata and saved files read it)."""

__version__ = "0.1.0"
