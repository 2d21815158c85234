"""The offline journal: MLflow operations a search could not complete, kept until they are replayed.

One JSON object per line in ``OUT/mlflow-pending.jsonl``, oldest first.  Each line carries
everything needed to redo the operation in another process (``slimforge sync``): where to send it,
the parent run it belongs to (by the search's ``search_id`` tag) and the payload itself.  Order
matters (a trial run needs its parent run, a registration needs its trial run), so operations are
replayed strictly in order and replay stops at the first one that still fails.

The file is rewritten atomically (temporary file + rename) after every change, so a killed search
never leaves a half-written journal; it is deleted once nothing is pending.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimforge.core.files import write_text_atomic

JOURNAL_NAME = "mlflow-pending.jsonl"
FORMAT = 1


def journal_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / JOURNAL_NAME


def read_journal(path: Path) -> list[dict]:
    """Pending operations, oldest first; ``[]`` when the file does not exist."""
    if not path.exists():
        return []
    ops = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except json.JSONDecodeError as exc:
            from slimforge.core.errors import ConfigError

            raise ConfigError(f"{path}:{number}: not a journal line ({exc}); fix or remove the line") from None
        # It may have half-happened before the journal was last written (a crash between doing it
        # and rewriting the file): replaying looks for what it would create before creating it.
        op["replay"] = True
        ops.append(op)
    return ops


def write_journal(path: Path, ops: list[dict]) -> None:
    """Replace the journal with ``ops``; remove it when ``ops`` is empty."""
    if not ops:
        path.unlink(missing_ok=True)
        return
    write_text_atomic(path, "".join(json.dumps(op, separators=(",", ":")) + "\n" for op in ops), fsync=True)
