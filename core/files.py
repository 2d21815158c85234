"""Files other processes read while they are being rewritten (``summary.json``, the MLflow
journal): written to a temporary name next to the target and renamed over it, so a reader or a
kill mid-write only ever sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``text``.  ``fsync``: the bytes are on disk before the rename, for a
    file that must survive a power cut, not only a killed process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    tmp.replace(path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))
