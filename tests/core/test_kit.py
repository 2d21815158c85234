"""The conformance kit as a plugin author meets it: on their own token-input architecture, run
without pytest fixtures, and failing with a message that names what is wrong."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import sf_testing_models
from slimforge.core.technique import Stage, Technique
from slimforge.core.testing import tiny_inputs
from slimforge.plugins.api import TechniqueConformance

VOCAB = 100  # not the kit's 64: the author's tagger reads its own token ids


class TinyTagger(nn.Module):
    """A token classifier of the author's own: Embedding -> LSTM -> Linear, mean over time."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 12)
        self.rnn = nn.LSTM(12, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0].mean(dim=1))


def tiny_tagger() -> nn.Module:
    torch.manual_seed(0)
    return TinyTagger().eval()


def tagger_tokens(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, 10), generator=generator)


TAGGER = f"{__name__}:tiny_tagger"


class TestWeightOnlyQuantOnTheAuthorsTagger(TechniqueConformance):
    technique = "weight_only_quant"
    architectures = (TAGGER, "slimforge.core.testing:tiny_gru")
    inputs = {TAGGER: tagger_tokens}  # the built-in tiny_gru needs none: the kit knows it reads tokens


def test_the_authors_inputs_reach_the_task():
    task = TestWeightOnlyQuantOnTheAuthorsTagger().task_for(TAGGER)
    x = task.split("val")[:][0]
    assert x.dtype == torch.int64 and x.shape == (256, 10) and int(x.max()) >= 64  # ids past the kit's vocab
    assert task.example_inputs()[0].shape == (1, 10)
    generator = torch.Generator().manual_seed(0)
    assert tiny_inputs("slimforge.core.testing:tiny_gru", 2, generator).dtype == torch.int64
    assert tiny_inputs("my_pkg:anything", 2, generator).shape == (2, 1, 12, 12)  # images unless told otherwise
    assert tiny_inputs("my_pkg:anything", 2, generator, "tokens").dtype == torch.int64


def test_an_unknown_input_kind_names_the_choices():
    with pytest.raises(ValueError, match=r"inputs: unknown 'text'; valid choices: images, tokens, or a callable"):
        tiny_inputs(TAGGER, 4, torch.Generator(), "text")


def test_the_kit_runs_without_pytest_by_calling_its_methods():
    kit = TestWeightOnlyQuantOnTheAuthorsTagger()
    for name in sorted(n for n in dir(kit) if n.startswith("test_")):
        getattr(kit, name)()  # no fixtures: each contract test takes only self


# --- a technique whose suggested config does not survive JSON: the kit names the field -------------

@dataclass(frozen=True, kw_only=True)
class _LayersConfig:
    layers: object = None  # the default is JSON; what suggest puts here is not


class _TupleSuggesting(Technique):
    name = "tuple_suggesting"
    family = "test"
    stage = Stage.QUANTIZATION + 5
    Config = _LayersConfig
    description = "Suggests a tuple, which JSON turns into a list."

    def suggest(self, space, task):
        return _LayersConfig(layers=(space.suggest_categorical("layer", ["fc1", "fc2"]),))

    def apply(self, model, config, ctx):
        ctx.note("tuple_suggesting: changes nothing")
        return model


class _TupleKit(TechniqueConformance):
    technique = "tuple_suggesting"
    extra_plugins = (sf_testing_models.Registers(_TupleSuggesting),)
    architectures = ("slimforge.core.testing:tiny_mlp",)


def test_a_config_that_json_changes_fails_the_kit_naming_the_field():
    with pytest.raises(AssertionError) as info:
        _TupleKit().test_config_json_round_trip()
    assert str(info.value).splitlines()[0] == (
        "tuple_suggesting (suggest seed 0): config field 'layers' = ('fc2',) comes back from JSON as ['fc2']; "
        "use a JSON type (list, dict, str, number, bool, None) or convert it in __post_init__")
