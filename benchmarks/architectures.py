"""Every technique on every weight kind: the technique x architecture table of the README.

For each registered technique and each conformance architecture (a CNN, a torch transformer
encoder, Hugging Face BERT / GPT-2 / Llama-style, a GRU; tiny configs from ``core.testing``), this
applies the technique the way a trial does (apply -> short recovery -> finishing), writes the
artifact, loads it back in this process and reports:

- ``ratio``: dense artifact bytes / compressed artifact bytes (both written by the same codec);
- ``rt``: ``=`` when the loaded model's logits equal the compressed model's bitwise, ``!=`` otherwise;
- the trial notes (``ctx.notes``): which weights the technique left alone and why.

A technique of the training stage (the distillation losses) changes how recovery trains, not what
is stored: its cell says ``trains only`` after the round trip was checked.

A cell that crashes prints ``FAIL`` with the exception.  The configuration of each technique is its
own ``suggest`` under a fixed suggester seed (``--seed``), so the same command prints the same table.

    python benchmarks/architectures.py                 # the whole table, markdown
    python benchmarks/architectures.py --techniques int8_dynamic low_rank --architectures tiny_gpt2 --notes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.outputs import logits_of
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import Stage
from slimforge.core.testing import ALL_ARCHITECTURES, compress, tiny_task

SHORT = {a: a.rpartition(":")[2].removeprefix("tiny_") for a in ALL_ARCHITECTURES}


def dense_bytes(task, folder: Path) -> int:
    path = folder / "dense.slim"
    return save_model(task.teacher, path, task=task, plan=Plan(seed=0))


def cell(plugins, name: str, task, folder: Path, seed: int) -> dict:
    from slimforge.core.space import FixedSuggester, scoped

    technique = plugins.registry.get(name)
    started = time.perf_counter()
    try:
        config = technique.suggest(scoped(FixedSuggester(seed=seed), technique.name), task)
        model, ctx = compress(technique, config, task, seed=seed)
        plan = Plan(steps=(PlanStep(technique.name, technique.config_to_dict(config)),), seed=seed)
        path = folder / f"{name}.slim"
        size = save_model(model, path, task=task, plan=plan, structure=[ctx.structure])
        loaded = load_model(path, plugins.registry).model
        x = task.split("val")[:][0][:16]
        with torch.inference_mode():
            same = torch.equal(logits_of(model(x)), logits_of(loaded(x)))
        return {"size": size, "roundtrip": same, "notes": list(ctx.notes), "seconds": time.perf_counter() - started}
    except Exception as exc:  # a crash is a cell of the table, not the end of it
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--techniques", nargs="*", help="technique names (default: every registered one)")
    parser.add_argument("--architectures", nargs="*", help=f"of {', '.join(SHORT.values())} with or without the tiny_ prefix "
                                                            "(default: all)")
    parser.add_argument("--seed", type=int, default=0, help="suggester seed that picks each technique's configuration")
    parser.add_argument("--notes", action="store_true", help="print every cell's notes under the table")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    plugins = Plugins(load_entry_points=False)
    techniques = args.techniques or plugins.registry.names()
    wanted = {a.removeprefix("tiny_") for a in args.architectures or SHORT.values()}
    architectures = [a for a in ALL_ARCHITECTURES if SHORT[a] in wanted]
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in architectures:
            task = tiny_task(architecture)
            folder = Path(tmp, SHORT[architecture])
            folder.mkdir()
            dense = dense_bytes(task, folder)
            for name in techniques:
                result = cell(plugins, name, task, folder, args.seed)
                result["dense"] = dense
                results[name, architecture] = result
                shown = result.get("error") or f"{dense / result['size']:.2f}x"
                print(f"  {name:<24} {SHORT[architecture]:<12} {shown}", file=sys.stderr, flush=True)
    header = "| technique | " + " | ".join(SHORT[a] for a in architectures) + " |"
    print(header)
    print("|---|" + "---:|" * len(architectures))
    for name in techniques:
        cells = []
        trains_only = plugins.registry.get(name).stage == Stage.TRAINING
        for architecture in architectures:
            r = results[name, architecture]
            if "error" in r:
                cells.append("FAIL")
            elif trains_only:
                cells.append("trains only" + ("" if r["roundtrip"] else " (outputs differ)"))
            else:
                mark = "" if r["roundtrip"] else " (outputs differ)"
                noted = "*" if r["notes"] else ""
                cells.append(f"{r['dense'] / r['size']:.2f}x{noted}{mark}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n`*`: the technique left some weights alone and said why (`--notes`).")
    if args.notes or any("error" in r for r in results.values()):
        print()
        for (name, architecture), r in results.items():
            lines = [r["error"]] if "error" in r else r["notes"] if args.notes else []
            for line in lines:
                print(f"- {name} / {SHORT[architecture]}: {line}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
