"""slimforge core: concepts shared by every plugin, free of optuna, ray and mlflow imports."""

from slimforge.core.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
