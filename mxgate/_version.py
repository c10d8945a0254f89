"""The distribution's version, in a leaf module: the core imports it without importing the public API."""

__version__ = "0.1.0"
