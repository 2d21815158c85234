"""Conformance kit: the contract tests every technique passes, built-in or third-party.

A plugin author subclasses ``TechniqueConformance`` in a pytest module::

    from slimforge.core.testing import TechniqueConformance

    class TestMyTechnique(TechniqueConformance):
        technique = "my_technique"          # registered name
        extra_plugins = (my_plugin_module,) # when the plugin is not installed as an entry point

and pytest runs: config JSON round trip, deterministic ``suggest`` under a fixed trial, ``apply``
on tiny models, artifact round trip with bitwise-identical outputs, size = file bytes, and the
declared composition rules honoured by the planner.  Tiny models and tasks live here too, so a
plugin's own tests need no data.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.task import FactoryRef, Task
from slimforge.core.technique import Stage, TechniqueContext

INPUT_SHAPE = (1, 12, 12)
NUM_CLASSES = 5


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Conv -> ReLU -> pool -> Conv -> ReLU -> flatten -> Linear -> ReLU -> Linear on 1x12x12."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 3 * 3, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES),
    ).eval()


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, NUM_CLASSES)).eval()


TINY_ARCHITECTURES = ("slimforge.core.testing:tiny_cnn", "slimforge.core.testing:tiny_mlp")


def tiny_task(architecture: str = TINY_ARCHITECTURES[0], n: int = 256, seed: int = 0) -> Task:
    """Random inputs labelled by the (seeded, untrained) teacher itself, so the teacher scores 1.0
    and any damage compression does is visible in the metric."""
    ref = FactoryRef(architecture)
    teacher = ref.call()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, *INPUT_SHAPE, generator=generator)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    splits = {name: TensorDataset(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n])
              for i, name in enumerate(("train", "val", "test"))}
    return Task(name="tiny", architecture=ref, teacher_factory=lambda: copy.deepcopy(teacher), splits=splits,
                source={"testing": architecture})


def compress(technique, config, task: Task, recovery_steps: int = 2, seed: int = 0):
    """Apply one technique the way a trial does (structural -> short recovery -> finishing);
    return ``(model, ctx)``."""
    from slimforge.core.recovery import AppliedStep, TeacherOutputs, recover

    ctx = TechniqueContext(task=task, seed=seed)
    model = technique.apply(copy.deepcopy(task.teacher), config, ctx)
    if technique.stage < Stage.RECOVERY and technique.needs_recovery and recovery_steps:
        subset = torch.utils.data.Subset(task.split("train"), range(min(len(task.split("train")), 32 * recovery_steps)))
        recover(model, [AppliedStep(technique, config, ctx)], subset, Recovery(epochs=1, lr=1e-3),
                seed=seed, batch_size=32, teacher_outputs=TeacherOutputs(task.teacher, subset))
    return model.eval(), ctx


class TechniqueConformance:
    """Contract tests; subclass and set ``technique`` (its registered name)."""

    technique: ClassVar[str]
    extra_plugins: ClassVar[tuple[Any, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = TINY_ARCHITECTURES
    suggest_seeds: ClassVar[tuple[int, ...]] = (0, 1, 2)

    # --- helpers ---------------------------------------------------------------------------------
    def _plugins(self):
        from slimforge.core.manager import Plugins

        return Plugins(extra_plugins=self.extra_plugins)

    def _suggest(self, technique, task, seed):
        from slimforge.core.space import FixedSuggester, scoped

        return technique.suggest(scoped(FixedSuggester(seed=seed), technique.name), task)

    # --- the contract ----------------------------------------------------------------------------
    def test_declares_contract(self):
        registry = self._plugins().registry
        technique = registry.get(self.technique)
        assert technique.name == self.technique
        # A Stage member, or a plain int between built-in stages (a third-party stage).
        assert isinstance(technique.stage, int) and not isinstance(technique.stage, bool)
        assert isinstance(technique.family, str) and technique.family, "a Family member or a non-empty string"
        assert technique.description, "a one-line description is shown by `slimforge plugins list`"
        for name in technique.cannot_follow | technique.cannot_precede:
            assert isinstance(name, str)

    def test_config_json_round_trip(self):
        technique = self._plugins().registry.get(self.technique)
        task = tiny_task(self.architectures[0])
        for seed in self.suggest_seeds:
            config = self._suggest(technique, task, seed)
            as_json = json.dumps(technique.config_to_dict(config))
            assert technique.config_from_dict(json.loads(as_json)) == config

    def test_suggest_is_deterministic(self):
        technique = self._plugins().registry.get(self.technique)
        task = tiny_task(self.architectures[0])
        for seed in self.suggest_seeds:
            assert self._suggest(technique, task, seed) == self._suggest(technique, task, seed)

    def test_artifact_round_trip_is_bitwise(self, tmp_path):
        from slimforge.core.compressed import load_model, save_model

        plugins = self._plugins()
        technique = plugins.registry.get(self.technique)
        for architecture in self.architectures:
            task = tiny_task(architecture)
            for seed in self.suggest_seeds[:2]:
                config = self._suggest(technique, task, seed)
                model, ctx = compress(technique, config, task, seed=seed)
                plan = Plan(steps=(PlanStep(technique.name, technique.config_to_dict(config)),), seed=seed)
                path = tmp_path / f"{architecture.rpartition(':')[2]}-{seed}.slim"
                size = save_model(model, path, task=task, plan=plan, structure=[ctx.structure])
                assert size == os.path.getsize(path) == plugins.measure_size(path)
                loaded = load_model(path, plugins.registry).model
                x = task.split("val")[:][0][:16]
                with torch.inference_mode():
                    expected, actual = model(x), loaded(x)
                assert torch.equal(expected, actual), f"{architecture} seed {seed}: outputs differ after load"

    def test_planner_honours_composition(self):
        from slimforge.core.planner import Planner
        from slimforge.core.space import FixedSuggester

        registry = self._plugins().registry
        planner = Planner(registry)
        task = tiny_task(self.architectures[0])
        for seed in range(25):
            plan = planner.sample(FixedSuggester(seed=seed), task, seed)
            classes = [type(registry.get(name)) for name in plan.technique_names]
            families = [cls.family for cls in classes]
            assert len(families) == len(set(families)), plan.describe()
            assert [c.stage for c in classes] == sorted(c.stage for c in classes), plan.describe()
            for i, later in enumerate(classes):
                for earlier in classes[:i]:
                    assert not later.conflicts_with(earlier), plan.describe()
                if later.must_follow:
                    assert any(c.name in later.must_follow for c in classes[:i]), plan.describe()
