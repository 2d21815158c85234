"""slimforge-example-plugins: ternary weights stored at 1.6 bits per weight (see ``plugin.py``)."""
