"""Built-in technique plugins.  They use the same hooks a third-party package uses."""

BUILTIN_PLUGINS = (
    "slimforge.plugins.distillation.student",
    "slimforge.plugins.distillation.knowledge",
    "slimforge.plugins.distillation.token",
    "slimforge.plugins.distillation.hint",
    "slimforge.plugins.pruning.magnitude",
    "slimforge.plugins.pruning.gradient",
    "slimforge.plugins.pruning.fisher",
    "slimforge.plugins.pruning.structured",
    "slimforge.plugins.quantization.int8_ptq",
    "slimforge.plugins.quantization.weight_only",
    "slimforge.plugins.quantization.int8_dynamic",
    "slimforge.plugins.sparsity.random_sparsity",
    "slimforge.plugins.sparsity.nm_sparsity",
    "slimforge.plugins.sparsity.max_entropy_sparsity",
    "slimforge.plugins.factorization.low_rank",
    "slimforge.plugins.sharing.kmeans",
    "slimforge.plugins.sharing.cosine_merge",
    "slimforge.plugins.oneshot.sparsegpt",
    "slimforge.plugins.oneshot.wanda",
    "slimforge.plugins.oneshot.gptq",
)
