"""Built-in technique plugins.  They use the same hooks a third-party package uses."""

BUILTIN_PLUGINS = (
    "slimforge.plugins.pruning.magnitude",
    "slimforge.plugins.quantization.int8_ptq",
)
