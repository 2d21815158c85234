"""Hugging Face models the way their users hold them: a folder written by ``save_pretrained``.

A task config names the folder and the ``AutoModelFor...`` class that loads it::

    [task]
    hf_model = "tiny-bert"                           # folder with config.json + weights (relative to the TOML)
    hf_class = "AutoModelForSequenceClassification"  # any transformers AutoModelFor... class
    data = "hf_example:build_data"                   # -> {"train", "val", "test"} of (input_ids, targets)
    metric = "..."                                   # optional, as for any task

The teacher is loaded offline (``local_files_only=True``: the folder is the model, the hub is never
asked).  The *architecture* an artifact rebuilds through is ``from_config`` of the same class with
the folder's config, recorded as JSON in the artifact header (``FactoryRef`` kwargs) and in the
task's source, so a compressed artifact reloads as the same class without the folder: ``slimforge
evaluate`` needs only the data factory.  Models return a ``ModelOutput``; ``core.outputs.logits_of``
reads its ``logits``.

Inputs are ``input_ids`` tensors ``(N, T)`` and the model is called as ``model(input_ids)``: no
attention mask or token types, so sequences should be unpadded (same length per batch).  For a
causal LM the targets are the next tokens ``(N, T)`` (the model gets no ``labels``, so it does no
shift of its own).

transformers is an optional dependency (``pip install 'slimforge[hf]'``); importing this module does
not import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimforge.core.errors import ConfigError, MissingDependencyError, TaskError

# Config fields that say where a model came from rather than what it is: left out of the recorded
# config, so an artifact does not depend on the folder's path.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "a Hugging Face model ([task] hf_model)", extra="hf") from None
    return transformers


def auto_class(name: str):
    """The ``transformers.AutoModelFor...`` class called ``name``; other names are refused."""
    transformers = _transformers()
    valid = sorted(n for n in dir(transformers) if n.startswith("AutoModel") and not n.startswith("AutoModelWith"))
    if not isinstance(name, str) or name not in valid:
        from slimforge.core.errors import UnknownNameError

        raise UnknownNameError("[task] hf_class", name, valid)
    return getattr(transformers, name)


def config_dict(path: str | Path) -> dict[str, Any]:
    """The folder's config as a JSON-able dict, without its provenance fields."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TaskError(f"[task] hf_model: cannot read a Hugging Face config from {path} "
                        f"({str(exc).splitlines()[0]})") from None
    return {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE_KEYS}


def from_config(auto_class_name: str, config: dict[str, Any]):
    """Architecture factory: an untrained model of ``auto_class_name`` built from a config dict
    (``model_type`` picks the config class).  Artifacts of Hugging Face tasks rebuild through it."""
    _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise TaskError(f"Hugging Face config: unknown model_type {model_type!r}")
    hf_config = CONFIG_MAPPING[model_type].from_dict(dict(config))
    return auto_class(auto_class_name).from_config(hf_config).eval()


def from_pretrained(auto_class_name: str, path: str):
    """Teacher factory: the trained model in ``path``, loaded offline in float32 (the dtype
    fine-tuning and every technique expect, whatever dtype the folder was saved in)."""
    transformers = _transformers()
    import torch

    # Its per-file progress bars would interleave with slimforge's own progress output.
    transformers.utils.logging.disable_progress_bar()
    try:
        model = auto_class(auto_class_name).from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise TaskError(f"[task] hf_model: cannot load {auto_class_name} from {path} "
                        f"({str(exc).splitlines()[0]})") from None
    return model.to(torch.float32).eval()


def model_refs(section: dict[str, Any], base_dir: Path, recorded_config: dict[str, Any] | None = None):
    """``(model, architecture, hf_config)`` for a ``[task]`` table with ``hf_model``: the first two
    as ``(target, kwargs)`` pairs that ``core.task`` makes ``FactoryRef``s of (this module sits
    below core.task, which imports it).

    ``recorded_config`` is the config a task source recorded (an artifact being evaluated): then
    the folder is not read, and only the teacher (which evaluation never builds) needs it."""
    for key in ("hf_model", "hf_class"):
        if not isinstance(section.get(key), str) or not section[key]:
            raise ConfigError(f"[task] {key}: required with a Hugging Face model, a string "
                              "(hf_model: a save_pretrained folder; hf_class: e.g. AutoModelForCausalLM)")
    for key in ("model", "model_kwargs", "architecture", "architecture_kwargs"):
        if key in section:
            raise ConfigError(f"[task] {key}: not used with hf_model (the folder is the model, and artifacts "
                              "rebuild from its recorded config); keep one of them")
    auto_class(section["hf_class"])  # a misspelt class fails now, with the valid names
    path = Path(section["hf_model"]).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if recorded_config is None:
        if not path.is_dir():
            raise TaskError(f"[task] hf_model: no such folder: {path} (a folder written by save_pretrained)")
        recorded_config = config_dict(path)
    model = ("slimforge.core.hf:from_pretrained", {"auto_class_name": section["hf_class"], "path": str(path)})
    architecture = ("slimforge.core.hf:from_config", {"auto_class_name": section["hf_class"], "config": recorded_config})
    return model, architecture, recorded_config
