"""AWQ-style activation-aware weight scaling before a weight-only quantizer.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration".  Weights that multiply large activations matter most; scaling input channel ``j``
of a weight matrix up by ``s_j`` (and its input down by ``s_j``) leaves the float function
unchanged but gives those weights finer quantization steps relative to their size.  Per group of
matrices that read the same input, the scales are ``s = a^alpha`` (normalised to geometric mean
1) with ``a_j`` the RMS of input channel ``j`` over the calibration tokens (the paper uses the
mean |x|; the RMS comes from the same statistics GPTQ gathers), and ``alpha`` is the one of 20
values in [0, 1) that minimises the quantized group's output error on calibration inputs,
``sum_c tr(dW_c H dW_c^T)`` with ``dW_c = Q(W_c diag(s)) diag(s)^-1 - W_c``, ``H = 2 X^T X`` and ``Q``
round-to-nearest on weight_only_quant's grid at the configured ``bits`` / ``group_size``, its
scale from the min-max range (the reference's scale search does not clip either)
(``alpha = 0``, no scaling, is a candidate: the search never makes that error worse).

The scales are *folded*, so nothing new is stored and the float function is unchanged: the
matrices' columns are multiplied by ``s`` and the op producing their input divides its output
channels by ``s``.  Folding is exact only where that op is per-channel affine and feeds only these
matrices; the places slimforge knows (by module structure, not class lists per model family):

- ``nn.TransformerEncoderLayer`` with ``norm_first``: ``norm1`` -> ``self_attn.in_proj_weight``,
  ``norm2`` -> ``linear1``;
- Llama-style decoder layers (``input_layernorm`` -> ``q/k/v_proj``, ``post_attention_layernorm``
  -> ``gate_proj`` / ``up_proj``, ``up_proj`` -> ``down_proj``, since ``down_proj`` reads
  ``act(gate) * up``);
- GPT-2 blocks (``ln_1`` -> ``attn.c_attn``, ``ln_2`` -> ``mlp.c_fc``);
- a final norm feeding an untied LM head (``ln_f`` -> ``head``, ``model.norm`` -> ``lm_head``).

Every other site is left unscaled with a note (post-norm layers like BERT's, where the norm's
output also feeds the residual; a tied LM head, whose columns are the embedding's; a Gemma-style
``(1 + w)`` norm).  A plan puts ``awq`` (``Stage.SCALING`` 65, ``Family.SCALING``) before ``gptq`` or
``weight_only_quant`` (stage 70), which then quantize the scaled weights; the planner samples it only
together with such a quantizer (``must_precede``): alone it compresses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import weight_sites
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import site_label
from slimforge.plugins.oneshot.calibration import calibration_inputs, gather_statistics
from slimforge.plugins.oneshot.gptq import BIT_CHOICES, BIT_RANGE, GROUP_SIZES, gptq_quantize, per_column

ALPHAS = tuple(i / 20 for i in range(20))


@dataclass(frozen=True, kw_only=True)
class AWQConfig:
    bits: int = 4  # the width the scales are searched for (the following quantizer's)
    group_size: int = 128  # as the following quantizer's; 0 = one scale per row
    symmetric: bool = True
    calibration_samples: int = 128
    calibration_batch_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not BIT_RANGE[0] <= self.bits <= BIT_RANGE[1]:
            raise ConfigError(f"awq.bits: must be an int in {BIT_RANGE[0]}..{BIT_RANGE[1]}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"awq.group_size: must be an int >= 0 (0 = one scale per row), got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"awq.symmetric: must be true or false, got {self.symmetric!r}")
        for count in ("calibration_samples", "calibration_batch_size"):
            value = getattr(self, count)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"awq.{count}: must be an int >= 1, got {value!r}")


# --- where a scale folds exactly -----------------------------------------------------------------

def _scalable_norm(module: nn.Module | None) -> bool:
    """A norm computing ``w * normalised(x) (+ b)``: its output channels divide exactly."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return module.weight is not None
    name = type(module).__name__
    return name.endswith("RMSNorm") and not name.startswith("Gemma") and isinstance(getattr(module, "weight", None),
                                                                                    nn.Parameter)


def fold_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(producer, [consumer site names])`` pairs where dividing the producer's output channels
    and multiplying the consumers' input columns by the same scales is exact (module docstring)."""
    modules = dict(model.named_modules())
    groups = []

    def add(producer: str, consumers: list[str]):
        owner = modules.get(producer)
        if (_scalable_norm(owner) or type(owner) is nn.Linear) and all(
                c.rpartition(".")[0] in modules or c in modules for c in consumers):
            groups.append((producer, consumers))

    for prefix, module in modules.items():
        dot = f"{prefix}." if prefix else ""
        children = dict(module.named_children())
        if isinstance(module, nn.TransformerEncoderLayer) and module.norm_first:
            if module.self_attn._qkv_same_embed_dim:
                add(f"{dot}norm1", [f"{dot}self_attn.in_proj_weight"])
            add(f"{dot}norm2", [f"{dot}linear1.weight"])
        attention, mlp = children.get("self_attn"), children.get("mlp")
        if "input_layernorm" in children and attention is not None and all(
                hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj")):
            add(f"{dot}input_layernorm", [f"{dot}self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")])
        if mlp is not None and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            if "post_attention_layernorm" in children:
                add(f"{dot}post_attention_layernorm", [f"{dot}mlp.gate_proj.weight", f"{dot}mlp.up_proj.weight"])
            add(f"{dot}mlp.up_proj", [f"{dot}mlp.down_proj.weight"])
        if "ln_1" in children and hasattr(children.get("attn"), "c_attn"):
            add(f"{dot}ln_1", [f"{dot}attn.c_attn.weight"])
        if "ln_2" in children and mlp is not None and hasattr(mlp, "c_fc"):
            add(f"{dot}ln_2", [f"{dot}mlp.c_fc.weight"])
    for norm, head in (("ln_f", "head"), ("model.norm", "lm_head"), ("transformer.ln_f", "lm_head")):
        if norm in modules and head in modules:
            add(norm, [f"{head}.weight"])
    return groups


def divide_output_channels(module: nn.Module, scales: torch.Tensor) -> None:
    """The producer's output channel ``j`` divided by ``scales[j]`` (a norm's weight and bias, or a
    Linear's weight rows and bias)."""
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            module.weight.div_(scales[:, None])
        else:
            module.weight.div_(scales)
        if getattr(module, "bias", None) is not None:
            module.bias.div_(scales)


# --- the scale search ---------------------------------------------------------------------------

def quantization_error(matrices: list[torch.Tensor], hessian: torch.Tensor, scales: torch.Tensor,
                       config: AWQConfig) -> float:
    """``sum_c tr(dW_c H dW_c^T)`` for round-to-nearest of the scaled matrices."""
    total = 0.0
    for matrix in matrices:
        scaled = matrix * scales[None, :]
        # Min-max grid, as the reference scale search's pseudo-quantizer: the following quantizer's
        # clipping search (46 ratios) run for each of 20 alphas made awq the costliest one-shot step.
        codes, scale, zero, _ = gptq_quantize(scaled, None, config.bits, config.group_size, config.symmetric, 0.01,
                                              False, scale_method="minmax")
        columns = matrix.shape[1]
        dequantized = (codes - per_column(zero, columns, config.group_size)).float() * per_column(
            scale, columns, config.group_size)
        delta = dequantized / scales[None, :] - matrix
        total += float(((delta @ hessian) * delta).sum())
    return total


def search_scales(matrices: list[torch.Tensor], hessian: torch.Tensor, square_norm: torch.Tensor, rows: int,
                  config: AWQConfig) -> tuple[torch.Tensor, float]:
    """The scales (and alpha) of ``ALPHAS`` with the least quantized output error."""
    rms = (square_norm / max(rows, 1)).sqrt().clamp(min=1e-8)
    best = (None, None, float("inf"))
    for alpha in ALPHAS:
        scales = rms ** alpha
        scales = (scales / (scales.max() * scales.min()).sqrt()).clamp(min=1e-4)
        error = quantization_error(matrices, hessian, scales, config)
        if error < best[2]:
            best = (scales, alpha, error)
    return best[0], best[1]


class AWQ(Technique):
    name = "awq"
    description = ("AWQ-style activation-aware per-channel weight scaling searched on calibration data for a "
                   "following weight-only quantizer, folded exactly into the preceding norm / projection.")
    family, stage, Config = Family.SCALING, Stage.SCALING, AWQConfig
    requires = frozenset({"calibration_data"})  # one-shot: no needs_recovery
    cannot_follow = frozenset({"kmeans_clustering"})
    # Scaling alone compresses nothing (the fold is exact): only before a quantizer of the weights.
    must_precede = frozenset({"gptq", "weight_only_quant", "int8_dynamic", "int8_ptq"})

    def suggest(self, space, task) -> AWQConfig:
        return AWQConfig(bits=space.suggest_categorical("bits", list(BIT_CHOICES)),
                         group_size=space.suggest_categorical("group_size", list(GROUP_SIZES)),
                         symmetric=space.suggest_categorical("symmetric", [True, False]))

    def apply(self, model: nn.Module, config: AWQConfig, ctx: TechniqueContext) -> nn.Module:
        model.eval()
        sites = weight_sites(model)
        modules = dict(model.named_modules())
        groups = []
        for producer, consumers in fold_groups(model):
            members = [sites.get(name) for name in consumers]
            if any(site is None or site.tied or site.is_derived(model) for site in members) or \
                    parametrize.is_parametrized(modules[producer]):
                continue  # a tied, derived or missing consumer: its columns cannot be scaled alone
            groups.append((producer, members))
        scaled = {site.name for _, members in groups for site in members}
        unscaled = [site_label(site) for name, site in sites.items() if name not in scaled]
        if unscaled:
            ctx.note(f"awq: no op to fold a scale into exactly for {', '.join(unscaled)}; left unscaled")
        if not groups:
            return model
        inputs = calibration_inputs(ctx.task, config.calibration_samples, config.calibration_batch_size,
                                    ctx.seed, next(model.parameters()).device)
        stats, _ = gather_statistics(model, [members[0] for _, members in groups], inputs)
        alphas = {}
        for producer, members in groups:
            first = stats.get(members[0].name)
            if first is None:
                ctx.note(f"awq: {site_label(members[0])}: no calibration inputs reached it; left unscaled")
                continue
            matrices = [site.matrix(model).detach().float() for site in members]
            scales, alpha = search_scales(matrices, first.hessian, first.square_norm, first.rows, config)
            alphas[producer] = alpha
            if alpha == 0.0:
                continue
            divide_output_channels(modules[producer], scales.to(modules[producer].weight.dtype))
            for site, matrix in zip(members, matrices, strict=True):
                site.set_matrix(model, matrix * scales[None, :])
        ctx.state["awq_alpha"] = alphas
        return model


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(AWQ)
