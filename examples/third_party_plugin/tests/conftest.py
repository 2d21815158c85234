"""Run the tests against the installed package when there is one, else against ../src."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("slimforge_ternary") is None or importlib.util.find_spec("slimforge_bias_correction") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
