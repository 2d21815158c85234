"""``must_follow``: a technique that only makes sense after another is never sampled alone."""

from dataclasses import dataclass

from slimforge.core.manager import Plugins
from slimforge.core.technique import Stage, Technique
from slimforge.core.testing import tiny_task
from slimforge.core.planner import Planner
from slimforge.core.space import FixedSuggester
from sf_testing_models import Registers


@dataclass(frozen=True, kw_only=True)
class _Empty:
    pass


class _Corrector(Technique):
    name, family, stage, Config, description = "corrector", "correction", Stage.QUANTIZATION + 5, _Empty, "test"
    must_follow = frozenset({"weight_only_quant"})

    def suggest(self, space, task):
        return _Empty()


def test_must_follow_is_honoured_and_the_pair_is_still_sampled():
    planner = Planner(Plugins(load_entry_points=False, extra_plugins=(Registers(_Corrector),)).registry,
                      ["weight_only_quant", "corrector"])
    task = tiny_task()
    plans = [planner.sample(FixedSuggester(seed=seed), task, seed).technique_names for seed in range(60)]
    assert all("corrector" not in names or "weight_only_quant" in names for names in plans)
    assert ["weight_only_quant", "corrector"] in plans
    assert ["weight_only_quant"] in plans
