"""Create a new sqlite MLflow store atomically.

MLflow creates a sqlite store in place on first use: it creates the tables, then runs a chain of
schema migrations, committing as it goes.  A search killed during that second or two (its very
first MLflow call) leaves a database stuck at an intermediate schema, which every later MLflow call
refuses ("Detected out-of-date database schema").  So when the file does not exist yet, slimforge
builds the store under a temporary name and links it into place only once it is complete: a kill
leaves at most a hidden ``.NAME.*.init`` file next to it, and the next run starts over.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PREFIX = "sqlite:///"


def prepare(uri: str) -> None:
    """Make sure the sqlite store at ``uri`` either does not exist or is complete."""
    if not uri.startswith(PREFIX):
        return
    path = Path(uri[len(PREFIX):].split("?", 1)[0])
    if not path.name or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.init")
    try:
        from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

        # The same store MLflow would create here (same default artifact root), under another name.
        _get_sqlalchemy_store(f"{PREFIX}{tmp}", None).engine.dispose()
        try:
            os.link(tmp, path)  # never replaces a store another process completed meanwhile
        except FileExistsError:
            pass
    except ImportError:  # private MLflow API moved: let MLflow create the store itself
        return
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)
