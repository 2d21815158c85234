"""One-shot compression without fine-tuning (issue 21): round-to-nearest vs GPTQ, magnitude vs
Wanda vs SparseGPT, with artifact bytes and metric drop, on trained sequence models.

Tasks (``--tasks``):

  chargpt   the embedded sequence task's trained teacher (``text_chargpt_task``: a 826K-parameter
            torch-layer character GPT, 4 pre-norm blocks, d 128), its cached teacher
  llama     a Hugging Face ``LlamaForCausalLM`` from a small config (4 layers, d 128, 4 query heads
            sharing 2 k/v heads, SiLU MLP 344) trained ``--llama-steps`` steps on the same text and
            split (1 thread; cached in ~/.cache/slimforge/teachers after the first run)
  tiny      ``text_chargpt_tiny_task`` (for a smoke run)

Arms: weight_only_quant (round-to-nearest, every site, no 8-bit ends) vs gptq at 4 and 3 bits, both
with one scale per row (group_size 0) and the same grid (asymmetric, so 3 bits has 8 levels), so the
same bytes; the 3-bit pair again with the embedding tables at 8 bits in both (no activations
reach a lookup table, so gptq rounds them to nearest like RTN); awq + gptq at 3 bits; magnitude (magnitude_pruning 50 % on the same sites the one-shot
pruners take, nm_sparsity 2:4) vs wanda vs sparsegpt at 50 % unstructured and 2:4, once on every
site but position embeddings (token embedding and LM head included; the one-shot pruners fall back
to magnitude on the embedding, which no activations reach) and once, as in the SparseGPT and Wanda
papers, on the repeated blocks' matrices only.  Every arm is
saved as an artifact, loaded back and measured from the loaded model: bytes = the file, metric =
next-token accuracy and perplexity on the test split (720 windows of 64 characters).  Seeds draw
the calibration samples (128 windows of the calibration split); the arms that use no calibration
(RTN, magnitude) are deterministic and run once.  Drop = teacher - compressed, mean +- std over seeds.

The memory figure (``--memory``) runs gptq on a ~100M-parameter Llama-style decoder with random
weights in fresh subprocesses (glibc's default allocator, and with a fixed mmap threshold): peak
resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the resident set (VmRSS) just
before the model was built, after a warm-up gptq run on a 2-layer copy has loaded every code path,
over the fp32 model's bytes.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/one_shot.py --tasks chargpt llama --seeds 0 1 2
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/one_shot.py --memory
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import evaluate
from slimforge.core.outputs import logits_of, task_loss
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.task import FactoryRef, Task
from slimforge.core.technique import TechniqueContext
from slimforge.core.sites import SiteKind, weight_sites
from slimforge.plugins.common import density_sites
from slimforge.plugins.oneshot.calibration import block_of, repeated_blocks


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- tasks --------------------------------------------------------------------------------------

LLAMA_CONFIG = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=0, pad_token_id=None)


def llama_task(steps: int, cache: Path) -> Task:
    """A Llama-style decoder trained ``steps`` steps on the embedded text task's split."""
    import transformers

    from slimforge.core.artifact import read_artifact, write_artifact
    from slimforge.core.hf import from_config
    from slimforge.core.text_task import PRESETS, VOCAB, text_splits

    transformers.logging.set_verbosity_error()
    splits = text_splits(**PRESETS["text-chargpt"]["data"])
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), **LLAMA_CONFIG).to_dict()
    config = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    architecture = FactoryRef("slimforge.core.hf:from_config", {"auto_class_name": "AutoModelForCausalLM",
                                                                "config": config})
    key = hashlib.sha256(json.dumps([LLAMA_CONFIG, steps, 1], sort_keys=True).encode()).hexdigest()[:12]
    path = cache / "teachers" / f"oneshot-llama-{key}.slim"
    model = from_config("AutoModelForCausalLM", config)
    if path.exists():
        model.load_state_dict(read_artifact(path)[1])
    else:
        log(f"llama: training {sum(p.numel() for p in model.parameters()):,} parameters for {steps} steps")
        started = time.perf_counter()
        train(model, splits["train"], steps)
        log(f"llama: trained in {time.perf_counter() - started:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_artifact(path, model.state_dict(), {"kind": "teacher", "task": "oneshot-llama", "steps": steps})
    model.eval()
    return Task(name="oneshot-llama", architecture=architecture, teacher_factory=lambda: copy.deepcopy(model),
                splits=splits, metric_name="next_token_accuracy", source={"benchmark": "one_shot llama"})


def train(model, data, steps: int, batch_size: int = 64, lr: float = 3e-3) -> None:
    x_all, y_all = data.tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        loss = task_loss(model(x_all[index]), y_all[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step}: loss {loss.item():.3f}")


def perplexity(model, dataset, batch_size: int = 240) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            x, y = dataset[start:start + batch_size]
            total += float(task_loss(logits_of(model(x)), y)) * y.numel()
            count += y.numel()
    return math.exp(total / count)


# --- arms ---------------------------------------------------------------------------------------

def arms(task: Task) -> dict[str, list[tuple[str, dict]]]:
    """Plan steps of every arm; pruned sites are the same for every pruner (all but position
    embeddings: ``plugins.common.density_sites``)."""
    sites = {site.setting_key: 0.5 for site in density_sites(task.teacher).values()}
    quant = {"group_size": 0, "symmetric": False}
    rtn = {"keep_ends_8bit": False, "symmetric": False}
    # Embedding tables have no input activations: both quantizers round them to nearest.  The
    # "emb 8-bit" rows keep them at 8 bits in both arms, so the rows compare the matrices GPTQ acts on.
    tables = {site.setting_key: 8 for site in weight_sites(task.teacher).values() if site.kind == SiteKind.EMBEDDING}
    every = weight_sites(task.teacher)
    found = repeated_blocks(task.teacher, every)
    blocks = {site.setting_key: 0.5 for site in every.values() if block_of(site, found) is not None}
    return {
        "fp32 teacher": [],
        "RTN 4-bit": [("weight_only_quant", {**rtn, "default_bits": 4})],
        "gptq 4-bit": [("gptq", {**quant, "default_bits": 4})],
        "RTN 3-bit": [("weight_only_quant", {**rtn, "default_bits": 3})],
        "gptq 3-bit": [("gptq", {**quant, "default_bits": 3})],
        "gptq 3-bit act_order": [("gptq", {**quant, "default_bits": 3, "act_order": True})],
        "RTN 3-bit, emb 8-bit": [("weight_only_quant", {**rtn, "default_bits": 3, "bits": tables})],
        "gptq 3-bit, emb 8-bit": [("gptq", {**quant, "default_bits": 3, "bits": tables})],
        "awq+gptq 3-bit": [("awq", {"bits": 3, "group_size": 0, "symmetric": False}),
                           ("gptq", {**quant, "default_bits": 3})],
        "magnitude 50%": [("magnitude_pruning", {"sparsity": sites})],
        "wanda 50%": [("wanda", {"default_sparsity": 0.5})],
        "sparsegpt 50%": [("sparsegpt", {"default_sparsity": 0.5})],
        "magnitude 2:4": [("nm_sparsity", {"n": 2, "m": 4})],
        "wanda 2:4": [("wanda", {"pattern": "2:4"})],
        "sparsegpt 2:4": [("sparsegpt", {"pattern": "2:4"})],
        "sparsegpt 2:4 + gptq 4-bit": [("sparsegpt", {"pattern": "2:4"}), ("gptq", {**quant, "default_bits": 4})],
        # The papers' setting: only the blocks' matrices pruned; embeddings and LM head dense.
        "magnitude 50%, blocks": [("magnitude_pruning", {"sparsity": blocks})],
        "wanda 50%, blocks": [("wanda", {"sparsity": blocks, "default_sparsity": 0.0})],
        "sparsegpt 50%, blocks": [("sparsegpt", {"sparsity": blocks, "default_sparsity": 0.0})],
        "magnitude 2:4, blocks": [(MAGNITUDE_NM, {"sparsity": blocks})],
        "wanda 2:4, blocks": [("wanda", {"pattern": "2:4", "sparsity": blocks, "default_sparsity": 0.0})],
        "sparsegpt 2:4, blocks": [("sparsegpt", {"pattern": "2:4", "sparsity": blocks, "default_sparsity": 0.0})],
    }


# nm_sparsity prunes every site; for the blocks-only rows its mask (nm_mask: the 2 largest |w| of
# every 4 inputs) is applied here to the blocks' sites only.  No plan step: the artifact is the
# teacher's architecture with zeros, which the codec stores sparsely like any pruned weights.
MAGNITUDE_NM = "magnitude 2:4 on the named sites"


def magnitude_nm(model, values: dict, ctx: TechniqueContext):
    from slimforge.plugins.common import apply_masks, site_mask
    from slimforge.plugins.sparsity.nm_sparsity import nm_mask

    sites = weight_sites(model)
    masks = {name: site_mask(site, nm_mask(site.matrix(model), 2, 4)) for name, site in sites.items()
             if site.setting_key in values["sparsity"]}
    apply_masks(model, masks, ctx)
    return model


CALIBRATED = {"gptq", "wanda", "sparsegpt", "awq"}


def run_arm(task: Task, plugins: Plugins, steps, seed: int, folder: Path) -> dict:
    model = copy.deepcopy(task.teacher)
    structures, plan_steps = [], []
    started = time.perf_counter()
    for name, values in steps:
        ctx = TechniqueContext(task=task, seed=seed)
        if name == MAGNITUDE_NM:
            model = magnitude_nm(model, values, ctx)
            continue
        technique = plugins.registry.get(name)
        config = technique.config_from_dict(values)
        model = technique.apply(model, config, ctx)
        structures.append(ctx.structure)
        plan_steps.append(PlanStep(name, technique.config_to_dict(config)))
    seconds = time.perf_counter() - started
    path = folder / f"arm-{seed}-{len(list(folder.iterdir()))}.slim"
    size = save_model(model.eval(), path, task=task, plan=Plan(steps=tuple(plan_steps), seed=seed),
                      structure=structures)
    loaded = load_model(path, plugins.registry, task=task).model.eval()
    test = task.split("test")
    return {"bytes": size, "accuracy": evaluate(loaded, test, task.metric), "perplexity": perplexity(loaded, test),
            "seconds": seconds}


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} +- {spread:.{digits}f}"


def table(task: Task, plugins: Plugins, seeds: list[int], only: list[str] | None = None) -> str:
    results = {}
    chosen = {label: steps for label, steps in arms(task).items()
              if only is None or label in only or label == "fp32 teacher"}
    with tempfile.TemporaryDirectory() as folder:
        for label, steps in chosen.items():
            calibrated = any(name in CALIBRATED for name, _ in steps)
            results[label] = [run_arm(task, plugins, steps, seed, Path(folder)) for seed in (seeds if calibrated
                                                                                             else seeds[:1])]
            r = results[label]
            log(f"  {label}: {r[0]['bytes']:,} B, acc {[round(x['accuracy'], 4) for x in r]}, "
                f"ppl {[round(x['perplexity'], 3) for x in r]}")
    base = results["fp32 teacher"][0]
    lines = ["| arm | artifact bytes | next-token acc | acc drop (pts) | perplexity | ppl rise | "
             "apply s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, runs in results.items():
        lines.append(
            f"| {label} | {statistics.fmean(r['bytes'] for r in runs):,.0f} | "
            f"{mean_std([r['accuracy'] for r in runs], 100)} | "
            f"{mean_std([base['accuracy'] - r['accuracy'] for r in runs], 100)} | "
            f"{mean_std([r['perplexity'] for r in runs], digits=3)} | "
            f"{mean_std([r['perplexity'] - base['perplexity'] for r in runs], digits=3)} | "
            f"{statistics.fmean(r['seconds'] for r in runs):.1f} |")
    return "\n".join(lines)


# --- memory ---------------------------------------------------------------------------------------

MEMORY_CONFIG = dict(vocab_size=8192, hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                     num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=None)


def memory_child(samples: int, length: int) -> None:
    """In a fresh process: peak RSS of one-shot gptq on a ~100M-parameter decoder, as JSON."""
    import gc

    import transformers
    from torch.utils.data import TensorDataset

    from slimforge.plugins.oneshot.gptq import GPTQ, GPTQConfig

    transformers.logging.set_verbosity_error()

    def task_of(model, config):
        tokens = torch.randint(0, config["vocab_size"], (samples, length + 1), generator=torch.Generator().manual_seed(0))
        data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return Task(name="memory", architecture=FactoryRef("builtins:dict"), teacher_factory=lambda: model,
                    splits={"train": data, "val": data, "test": data}, source={"benchmark": "memory"})

    def build(config):
        llama = transformers.LlamaConfig(**config)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(llama)
        model = model.to_empty(device="cpu")  # weights without init's temporaries; values below
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        # to_empty leaves buffers uninitialised too: the rotary frequencies are computed again (left
        # as they were, they are whatever the memory held, and attention turns NaN now and then).
        model.model.rotary_emb = type(model.model.rotary_emb)(config=llama)
        return model.eval()

    gptq = GPTQ()
    config = GPTQConfig(default_bits=4, calibration_samples=samples, calibration_batch_size=8)
    # Warm-up on a 2-layer copy: transformers' Llama code, torch's kernels and slimforge's codec are
    # loaded (hundreds of MB of code and libraries) before the baseline, so it counts only data.
    small = {**MEMORY_CONFIG, "num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 160,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    warm = build(small)
    gptq.apply(warm, config, TechniqueContext(task=task_of(warm, small)))
    del warm
    gc.collect()
    baseline_kb, peak_before_kb = _current_rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(MEMORY_CONFIG)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    task = task_of(model, MEMORY_CONFIG)
    started = time.perf_counter()
    gptq.apply(model, config, TechniqueContext(task=task))
    print(json.dumps({"model_bytes": model_bytes, "baseline_rss_kb": baseline_kb,
                      "peak_before_model_kb": peak_before_kb,
                      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "end_rss_kb": _current_rss_kb(), "seconds": time.perf_counter() - started}))


def _current_rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed tensors stay
# in the heap (resident) instead of going back to the OS; a fixed threshold keeps them mmapped.
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def memory_table(samples: int, length: int) -> str:
    import os

    children = {name: subprocess.Popen([sys.executable, __file__, "--memory-child", str(samples), str(length)],
                                       stdout=subprocess.PIPE, text=True, env={**os.environ, **extra})
                for name, extra in ALLOCATORS.items()}
    lines = ["| allocator | fp32 model bytes | peak RSS - baseline | ratio | RSS after - baseline | gptq s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, child in children.items():
        out, _ = child.communicate()
        if child.returncode:
            raise SystemExit(f"memory child ({name}) failed with exit code {child.returncode}")
        r = json.loads(out.strip().splitlines()[-1])
        peak, end = ((r[key] - r["baseline_rss_kb"]) * 1024 for key in ("peak_rss_kb", "end_rss_kb"))
        lines.append(f"| {name} | {r['model_bytes']:,} | {peak:,} | {peak / r['model_bytes']:.2f}x | {end:,} | "
                     f"{r['seconds']:.0f} |")
    model = (f"Llama-style decoder, {MEMORY_CONFIG['num_hidden_layers']} layers, d {MEMORY_CONFIG['hidden_size']}, "
             f"MLP {MEMORY_CONFIG['intermediate_size']}, vocab {MEMORY_CONFIG['vocab_size']}, random weights; gptq "
             f"4-bit, {samples} x {length} calibration tokens")
    return model + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["chargpt"], choices=["chargpt", "llama", "tiny"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", help="only these arms (labels as in the table; the teacher row always)")
    parser.add_argument("--llama-steps", type=int, default=600)
    parser.add_argument("--memory", action="store_true", help="only the peak-memory figure")
    parser.add_argument("--memory-samples", nargs=2, type=int, default=[32, 256], metavar=("SAMPLES", "LENGTH"))
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.memory:
        print(memory_table(*args.memory_samples))
        return
    from slimforge.core.embedded import cache_dir
    from slimforge.core.text_task import text_chargpt_task, text_chargpt_tiny_task

    plugins = Plugins(load_entry_points=False)
    for name in args.tasks:
        task = {"chargpt": text_chargpt_task, "tiny": text_chargpt_tiny_task}.get(name, lambda: None)() \
            or llama_task(args.llama_steps, cache_dir())
        log(f"{name}: {sum(p.numel() for p in task.teacher.parameters()):,} parameters")
        print(f"\n### {name} (seeds {' '.join(map(str, args.seeds))})\n")
        print(table(task, plugins, args.seeds, args.arms), flush=True)


if __name__ == "__main__":
    main()
