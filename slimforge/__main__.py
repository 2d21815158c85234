"""``python -m slimforge``: the ``slimforge`` command, for environments without its script on PATH."""

import sys

from slimforge.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
