"""slimforge: find the best compressed versions of a PyTorch model under hard size, latency and
accuracy budgets.

The package's parts live in the repository's top-level folders (``slimforge.core``, ``.plugins``,
``.search``, ``.tracking``, ``.app``; see ``package-dir`` in pyproject.toml).  This module imports
none of them: ``import slimforge`` stays cheap, and ``slimforge.__version__`` needs no torch.
"""

from importlib import metadata

try:
    __version__ = metadata.version("slimforge")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
