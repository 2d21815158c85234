"""slimforge-bias-correction: a third-party slimforge technique plugin (see ``plugin.py``)."""

__version__ = "0.1.0"
