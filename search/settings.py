"""How to search: ``SearchSettings``, declared once.

Every setting is one dataclass field whose ``option(...)`` metadata says how a user gives it: the
command-line flag, the ``[search]`` key of a ``--config`` file (the flag's name with underscores),
the value's kind, the help line and the simple rules it must meet.  From these declarations come
the ``slimforge search`` flags (``add_arguments``), the config-file schema and its type errors
(``settings_from``), the validation messages (``__post_init__``) and the README's settings table
(``docs_table``; a test keeps the README in step).  Adding a setting is adding a field.

This module imports no torch, Optuna or MLflow: the command line rejects bad input through it
before anything heavy has loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from slimforge.core.errors import ConfigError, UnknownNameError
from slimforge.core.measure import LatencySettings
from slimforge.search.budgets import parse_accuracy, parse_accuracy_drop, parse_size

DEVICES = ("cpu", "cuda")
BACKENDS = ("optuna", "ray")
SCHEDULERS = ("fifo", "asha")
SAMPLERS = ("tpe", "nsga2", "gp", "random")
MAX_SEED = 2**31 - 1

# Through Ray Client, Tune would run the searcher on the head node, away from this search's study,
# trackers and progress bar; a search joins the cluster from one of its nodes instead.
RAY_CLIENT_REFUSED = ("{source}: Ray Client addresses (ray://...) are not supported: Tune would run the search "
                      "loop on the head node. Run slimforge search on a node of the cluster with --ray-address auto "
                      "(or the head's host:6379)")

# Kinds of value: what a config file must hold (the type error names it) and how it is converted.
KINDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "int": ("an integer", (int,)),
    "float": ("a number", (int, float)),
    "bool": ("true or false", (bool,)),
    "text": ("a string", (str,)),
    "names": ("a list of names or a comma-separated string", (list, str)),
    "size": ("a size like \"4GB\" or a number of bytes", (str, int)),
    "fraction": ("a fraction like 0.9 or a percentage like \"90%\"", (str, int, float)),
    "points": ("points like \"10pt\" or a fraction like 0.1", (str, int, float)),
}


def option(default: Any, flag: str, help: str, *, kind: str = "text", group: str = "search", choices=(),
           at_least: float | None = None, above: float | None = None, at_most: float | None = None, unit: str = "",
           ray_only: bool = False,
           not_with_ray: str | None = None, in_config: bool = True, cli_choices: bool = False,
           default_factory=None) -> Any:
    """A ``SearchSettings`` field and how it is given.  ``flag`` ``--no-x`` means a switch that sets
    ``x`` false; ``at_least`` / ``above`` / ``choices`` are checked on construction with messages
    naming ``flag`` (``at_most`` too: an upper bound); ``ray_only`` settings must keep their default unless ``backend = "ray"``;
    ``not_with_ray`` gives the reason a setting must stay unset with it."""
    meta = {"flag": flag, "help": help, "kind": kind, "group": group, "choices": tuple(choices), "at_least": at_least,
            "above": above, "at_most": at_most, "unit": unit, "ray_only": ray_only, "not_with_ray": not_with_ray,
            "in_config": in_config, "cli_choices": cli_choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"option": meta})
    return field(default=default, metadata={"option": meta})


# The latency settings live in core (``LatencySettings``); these are their flags.
LATENCY_OPTIONS = {
    "threads": {"flag": "--latency-threads", "kind": "int", "help": "CPU threads while timing (default 1)"},
    "warmup": {"flag": "--latency-warmup", "kind": "int", "help": "untimed forward passes before timing (default 20)"},
    "repeats": {"flag": "--latency-repeats", "kind": "int", "help": "timed repeats after warm-up (default 100)"},
    "batch_size": {"flag": "--latency-batch-size", "kind": "int", "help": "batch size timed (default 1)"},
    "cuda_graph": {"flag": "--latency-cuda-graph", "kind": "bool",
                   "help": "with --device cuda: time replays of a captured CUDA graph (what a server using graphs "
                           "pays) instead of eager launches, which for small models are mostly launch overhead"},
}
NOT_WITH_RAY = ("not supported with --backend ray (Ray's memory monitor kills trials that exhaust memory); "
                "use --backend optuna")
TRACKING_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir)"


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How to search.  Defaults live here and nowhere else."""

    trials: int = option(20, "--trials", "total trials in the study (default 20)", kind="int", at_least=1)
    timeout_s: float | None = option(None, "--timeout", "stop starting trials after this many seconds",
                                     kind="float", above=0, unit=" seconds")
    techniques: tuple[str, ...] | None = option(
        None, "--techniques", "comma-separated technique names to search over (default: all; see 'slimforge plugins "
        "list')", kind="names")
    disabled_plugins: tuple[str, ...] = option((), "--disable-plugins", "comma-separated plugin (entry point) or "
                                               "technique names to leave out", kind="names")
    strict_plugins: bool = option(False, "--strict-plugins", "fail when a third-party plugin cannot load (default: "
                                  "name it on stderr and skip it)", kind="bool")
    # Optuna's samplers take numpy seeds (0 .. 2**32 - 1); a resumed study and each worker add offsets
    # (trials recorded, a per-worker stride under 1e9), so the user's seed stays below 2**31.
    seed: int = option(0, "--seed", f"sampler and trial seed, 0 to {MAX_SEED} (default 0)", kind="int", at_least=0, at_most=MAX_SEED)
    study: str | None = option(None, "--study", "study name; an existing name resumes that study")
    storage: str | None = option(None, "--storage", "Optuna storage URL (default: sqlite file OUT/optuna.db)")
    out_dir: Path = option(Path("slimforge-out"), "--out", "output directory (default slimforge-out)")
    device: str = option("cpu", "--device", "cpu (default) or cuda: where training and timing happen",
                         choices=DEVICES)
    sampler: str = option("tpe", "--sampler", "tpe (default: grouped multivariate TPE), nsga2, gp (Gaussian process) "
                          "or random (baseline); all see the budgets as constraints", choices=SAMPLERS)
    per_layer_knobs: bool = option(False, "--per-layer-knobs", "search one density / bit width per weight site "
                                   "(default: a few global knobs per technique, spread over the sites by their "
                                   "measured sensitivity)", kind="bool")
    finetune: bool = option(True, "--no-finetune", "search without fine-tuning: plans hold only the techniques that "
                            "need no recovery training (one-shot: quantizers, calibration-only methods), no trial "
                            "trains, each costs seconds; for models too large to fine-tune per trial", kind="bool")
    expert_seeds: bool = option(True, "--no-expert-seeds", "do not start the study with the expert plans (Deep "
                                "Compression, int8, structured + int8, a distilled student; with --no-finetune: "
                                "GPTQ, SparseGPT 2:4 + GPTQ, weight-only and int8) scaled to the budgets",
                                kind="bool")
    workers: int = option(1, "--workers", "trials at once, each in a worker process (default 1: in this process)",
                          kind="int", at_least=1)
    trial_timeout_s: float | None = option(
        None, "--trial-timeout", "seconds after which a trial is killed and recorded as failed (runs trials in a "
        "worker process)", kind="float", above=0, unit=" seconds", not_with_ray=NOT_WITH_RAY)
    trial_memory_limit: int | None = option(
        None, "--trial-memory-limit", "extra memory a trial may allocate, e.g. 4GB; beyond it the trial fails with "
        "out-of-memory (runs trials in a worker process)", kind="size", not_with_ray=NOT_WITH_RAY)
    latency: LatencySettings = option(None, "--latency-*", "how latency is timed", kind="latency",
                                      default_factory=LatencySettings)
    progress: bool = option(True, "--no-progress", "no progress bar", kind="bool", in_config=False)
    backend: str = option("optuna", "--backend", "optuna (default): trials here or in --workers processes; ray: Ray "
                          "Tune trials on a local Ray or a cluster (pip install 'slimforge[ray]')", choices=BACKENDS,
                          group="search at scale", cli_choices=True)
    ray_address: str | None = option(None, "--ray-address", "Ray cluster to join from one of its nodes: auto or "
                                     "HEAD:6379 (default: $RAY_ADDRESS, else a local Ray on every CPU; ray:// is not "
                                     "supported)", group="search at scale", ray_only=True)
    cpus_per_trial: float = option(1.0, "--cpus-per-trial", "Ray CPUs per trial (default 1; fractions allowed)",
                                   kind="float", above=0, group="search at scale", ray_only=True)
    gpus_per_trial: float = option(0.0, "--gpus-per-trial", "Ray GPUs per trial (default 0; fractions such as 0.25 "
                                   "share a GPU; needs --device cuda)", kind="float", at_least=0,
                                   group="search at scale", ray_only=True)
    scheduler: str = option("fifo", "--scheduler", "Ray trial scheduler: fifo (default) runs every trial to the end; "
                            "asha stops trials whose validation score trails the others after an epoch",
                            choices=SCHEDULERS, group="search at scale", ray_only=True, cli_choices=True)
    tracking_uri: str | None = option(None, "--tracking-uri", TRACKING_URI_HELP, group="tracking")
    tracking: bool = option(True, "--no-tracking", "do not log to MLflow", kind="bool", group="tracking")
    experiment: str = option("slimforge", "--experiment", "MLflow experiment name (default slimforge)",
                             group="tracking")
    registered_model: str | None = option(None, "--registered-model", "registered model name for Pareto members "
                                          "(default <task>-compressed)", group="tracking")
    # Pareto members below a registration floor are reported, not registered.  Both None: the
    # default floor (``search.pareto.registration_floor``); with both set the stricter wins.
    register_min_accuracy: float | None = option(
        None, "--register-min-accuracy", "register only Pareto members with at least this validation metric: 0.9 or "
        "90%; the others stay in the summary, marked not registered (default: the baseline's minus 10pt, or the "
        "accuracy budget where that is lower)", kind="fraction", group="tracking")
    register_max_accuracy_drop: float | None = option(
        None, "--register-max-accuracy-drop", "register only Pareto members within this drop from the uncompressed "
        "model's validation metric: 10pt (= 10% = 0.1); with --register-min-accuracy the stricter wins",
        kind="points", group="tracking")

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        for f, meta in options():
            _check(meta, getattr(self, f.name))
        if self.latency.cuda_graph and not self.device.startswith("cuda"):
            raise ConfigError("--latency-cuda-graph: CUDA graphs need --device cuda")
        if not self.finetune and self.scheduler == "asha":
            raise ConfigError("--scheduler: asha compares trials between recovery epochs, and a search with "
                              "--no-finetune trains none; valid choices here: fifo")
        if self.backend != "ray":
            for f, meta in options():
                if meta["ray_only"] and getattr(self, f.name) != f.default:
                    raise ConfigError(f"{meta['flag']}: only applies to --backend ray (this search uses --backend "
                                      f"{self.backend})")
            return
        if self.workers != 1:
            raise ConfigError("--workers: not used with --backend ray, which runs as many trials at once as the "
                              "cluster's resources allow; set --cpus-per-trial / --gpus-per-trial instead")
        for f, meta in options():
            if meta["not_with_ray"] and getattr(self, f.name) is not None:
                raise ConfigError(f"{meta['flag']}: {meta['not_with_ray']}")
        if self.ray_address and self.ray_address.startswith("ray://"):
            raise ConfigError(RAY_CLIENT_REFUSED.format(source="--ray-address"))
        if self.gpus_per_trial > 0 and not self.device.startswith("cuda"):
            raise ConfigError("--gpus-per-trial: GPUs are only used with --device cuda")

    def resolved(self, task_name: str) -> SearchSettings:
        """The defaults that depend on the task and the working directory, filled in."""
        study = self.study or f"{task_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        storage = self.storage or f"sqlite:///{(self.out_dir / 'optuna.db').resolve()}"
        tracking_uri = resolve_tracking_uri(self.tracking_uri)
        return dataclasses.replace(self, study=study, storage=storage, tracking_uri=tracking_uri,
                                   registered_model=self.registered_model or f"{task_name}-compressed")

    def check_out_dir(self) -> None:
        """Refuse an ``--out`` that cannot become a writable folder, before any work and without
        creating anything: a part of the path that is a file, or a nearest existing folder this
        process cannot create files in (probed with an unnamed temporary file, which leaves no
        trace, because ``os.access`` says yes to root on a read-only or virtual filesystem)."""
        import tempfile

        path = self.out_dir
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"--out: {str(existing)!r} is a file, not a folder; give a folder to write the "
                              "results to")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            where = "" if existing == path else f" (its nearest existing folder {str(existing)!r} is not writable)"
            raise ConfigError(f"--out: cannot write to {str(path)!r}{where}: {exc.strerror or exc}") from None

    @property
    def uses_worker_processes(self) -> bool:
        """Trials run in worker processes: several at once, or each under a time or memory limit."""
        return self.workers > 1 or self.trial_timeout_s is not None or self.trial_memory_limit is not None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSettings:
        """Inverse of ``to_dict`` (settings stored in a study travel as JSON); unknown keys, from
        a newer slimforge, are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["latency"] = LatencySettings(**kwargs.get("latency", {}))
        for key in ("techniques", "disabled_plugins"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def resolve_tracking_uri(given: str | None) -> str:
    """The MLflow tracking URI, first found: ``given`` (``--tracking-uri``, ``[search]
    tracking_uri``), then ``$MLFLOW_TRACKING_URI`` (what MLflow's own clients read), then
    ``sqlite:///mlflow.db`` in the working directory."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def options() -> list[tuple[dataclasses.Field, dict[str, Any]]]:
    """Every ``SearchSettings`` field with its option metadata, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(SearchSettings)]


def _check(meta: dict[str, Any], value: Any) -> None:
    if value is None:
        return
    flag = meta["flag"]
    if meta["kind"] == "float" and not math.isfinite(value):  # nan passes every comparison below
        raise ConfigError(f"{flag}: must be a finite number, got {value}")
    if meta["choices"] and str(value).split(":")[0] not in meta["choices"]:  # "cuda:1" is a cuda device
        raise UnknownNameError(flag, value, meta["choices"])
    if meta["at_least"] is not None and value < meta["at_least"]:
        raise ConfigError(f"{flag}: must be >= {meta['at_least']:g}, got {value}")
    if meta["at_most"] is not None and value > meta["at_most"]:
        raise ConfigError(f"{flag}: must be <= {meta['at_most']}, got {value}")
    if meta["above"] is not None and value <= meta["above"]:
        raise ConfigError(f"{flag}: must be > {meta['above']:g}{meta['unit']}, got {value}")
    if meta["kind"] in ("fraction", "points") and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag}: must be a fraction between 0 and 1, got {value}")


def _flat_options() -> list[tuple[str, str | None, dict[str, Any]]]:
    """(settings field, latency field or None, metadata) for every flag, latency flags spread out."""
    out = []
    for f, meta in options():
        if meta["kind"] == "latency":
            out += [(f.name, name, {**meta, **sub, "choices": ()}) for name, sub in LATENCY_OPTIONS.items()]
        else:
            out.append((f.name, None, meta))
    return out


def _key(meta: dict[str, Any]) -> str:
    """The attribute / ``[search]`` key of a flag: ``--trial-timeout`` -> ``trial_timeout``."""
    return meta["flag"].removeprefix("--").removeprefix("no-").replace("-", "_")


def config_keys() -> list[str]:
    return sorted(_key(meta) for _, _, meta in _flat_options() if meta["in_config"])


def add_arguments(parser) -> None:
    """The ``slimforge search`` flags, one per setting, in groups."""
    groups: dict[str, Any] = {}
    for _, _, meta in _flat_options():
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        help_text = meta["help"].replace("%", "%%")
        if meta["flag"].startswith("--no-"):
            group.add_argument(meta["flag"], action="store_true", help=help_text)
        elif meta["kind"] == "bool":
            group.add_argument(meta["flag"], action="store_true", default=None, help=help_text)
        else:
            kwargs = {"type": {"int": int, "float": float}.get(meta["kind"], str), "help": help_text}
            if meta["cli_choices"]:
                kwargs["choices"] = meta["choices"]
            group.add_argument(meta["flag"], **kwargs)


def settings_from(args, table: dict[str, Any]) -> SearchSettings:
    """The settings from parsed flags (``args``, from ``add_arguments``) over a config file's
    ``[search]`` table: unknown keys and values of the wrong kind are one-line errors."""
    for key in table:
        if key not in config_keys():
            raise UnknownNameError("[search] key", key, config_keys())
    for _, _, meta in _flat_options():  # every value in the file, even one a flag overrides
        if meta["in_config"] and _key(meta) in table:
            _check_kind(meta, table[_key(meta)], f"[search] {_key(meta)}")
    kwargs: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    for name, sub, meta in _flat_options():
        key = _key(meta)
        given = getattr(args, meta["flag"].removeprefix("--").replace("-", "_"), None)
        if meta["flag"].startswith("--no-"):
            value, source = (False, meta["flag"]) if given else (table.get(key), f"[search] {key}")
        elif given is not None:
            value, source = given, meta["flag"]
        else:
            value, source = table.get(key), f"[search] {key}"
        if value is None:
            continue
        value = _converted(meta, value, source)
        if sub is None:
            kwargs[name] = value
        else:
            latency[sub] = value
    if latency:
        kwargs["latency"] = LatencySettings(**latency)
    return SearchSettings(**kwargs)


def _check_kind(meta: dict[str, Any], value: Any, source: str) -> None:
    expected, types = KINDS[meta["kind"]]
    wrong_bool = isinstance(value, bool) and bool not in types
    wrong_item = isinstance(value, list) and not all(isinstance(item, str) for item in value)
    if not isinstance(value, types) or wrong_bool or wrong_item:
        raise ConfigError(f"{source}: expected {expected}, got {value!r}")


def _converted(meta: dict[str, Any], value: Any, source: str) -> Any:
    kind = meta["kind"]
    if kind == "names":
        items = value.split(",") if isinstance(value, str) else value
        names = tuple(str(item).strip() for item in items if str(item).strip())
        return names or (None if meta["flag"] == "--techniques" else ())
    if kind == "size":
        return parse_size(value, source)
    if kind == "fraction":  # the same formats as the budgets --min-accuracy and --max-accuracy-drop
        return parse_accuracy(value, source)
    if kind == "points":
        return parse_accuracy_drop(value, source)
    if meta["flag"] == "--out":
        return Path(value)
    return value


def docs_table() -> str:
    """The README's table of ``slimforge search`` settings (``tests/search/test_settings.py``
    checks that the README holds exactly this)."""
    rows = ["| flag | `[search]` key | value | what it does |", "|---|---|---|---|"]
    for _, _, meta in _flat_options():
        key = f"`{_key(meta)}`" if meta["in_config"] else "-"
        value = f"one of {', '.join(meta['choices'])}" if meta["choices"] else KINDS[meta["kind"]][0]
        rows.append(f"| `{meta['flag']}` | {key} | {value} | {meta['help'].replace('|', '/')} |")
    return "\n".join(rows)
