"""One error tree for slimforge.

Every error a user can cause is a ``SlimforgeError``; the CLI prints its one-line message and exits
with code 2.  Subclasses also inherit the matching built-in type so callers that catch ``ValueError``
or ``LookupError`` keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


class SlimforgeError(Exception):
    """Base class of every error slimforge raises on purpose."""


class ConfigError(SlimforgeError, ValueError):
    """A configuration value is malformed or out of range."""


class UnknownNameError(SlimforgeError, LookupError):
    """A name (technique, option, task...) is not one of the valid choices."""

    def __init__(self, field: str, name: object, choices: Iterable[str]):
        self.field, self.name, self.choices = field, name, sorted(choices)
        listed = ", ".join(self.choices) if self.choices else "(none available)"
        super().__init__(f"{field}: unknown {name!r}; valid choices: {listed}")

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return self.args[0]


class TaskError(SlimforgeError, ValueError):
    """A task's model, data or metric factory failed or returned something unusable."""


class ArtifactError(SlimforgeError, ValueError):
    """A compressed-model artifact is unreadable, corrupted or from a newer format."""


class PluginError(SlimforgeError, RuntimeError):
    """A plugin failed to load, register or honour the technique contract."""


class MissingDependencyError(SlimforgeError, ImportError):
    """An optional dependency is needed for the requested feature."""

    def __init__(self, package: str, feature: str, extra: str | None = None):
        hint = f"pip install 'slimforge[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the '{package}' package: {hint}")


class TrialRejected(SlimforgeError):
    """A plan was rejected before training because its size already breaks the budget."""
