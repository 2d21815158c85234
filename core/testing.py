"""Conformance kit: the contract tests every technique passes, built-in or third-party.

A plugin author subclasses ``TechniqueConformance`` in a pytest module (``pip install
'slimforge[plugin-dev]'`` brings pytest and transformers)::

    from slimforge.plugins.api import TechniqueConformance

    class TestMyTechnique(TechniqueConformance):
        technique = "my_technique"          # registered name
        extra_plugins = (my_plugin_module,) # harmless when the installed entry point registers it too
        architectures = ALL_ARCHITECTURES + ("my_pkg.models:tiny_tagger",)  # optional: the author's own
        inputs = {"my_pkg.models:tiny_tagger": "tokens"}                      # what those read

and pytest runs: config JSON round trip, deterministic ``suggest`` under a fixed trial, ``apply``
on tiny models, artifact round trip with bitwise-identical outputs, size = file bytes, and the
declared composition rules honoured by the planner.  Tiny models and tasks live here too, so a
plugin's own tests need no data.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.task import FactoryRef, Task
from slimforge.core.technique import Stage, TechniqueContext, json_round_trip_problem

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


# --- sequence models: the weight kinds transformers and RNNs bring (core.sites) ---------------------
# Token inputs of SEQ_LEN ids < VOCAB.  Classifiers pool to (N, NUM_CLASSES); language models
# return per-token logits (N, SEQ_LEN, VOCAB) and are labelled per token by their own argmax.
VOCAB, SEQ_LEN, WIDTH = 64, 16, 32


class TinyTransformerClassifier(nn.Module):
    """Token embedding + a learned position *tensor* (a plain Parameter, as hand-written models
    hold one) + nn.TransformerEncoder (nn.MultiheadAttention, LayerNorm) + mean pool + Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(1, SEQ_LEN, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos[:, : tokens.shape[1]]).mean(dim=1))


def tiny_transformer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyTransformerClassifier().eval()


class TinyGRUClassifier(nn.Module):
    """Embedding -> GRU (weight_ih / weight_hh, three gates) -> Linear on the last hidden state."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.GRU(16, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[1][-1])


def tiny_gru(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyGRUClassifier().eval()


def _transformers():
    try:
        import transformers
    except ImportError:  # a test extra: the built-in techniques never need it
        raise ImportError("the Hugging Face test architectures need transformers: pip install 'slimforge[test]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def tiny_bert(seed: int = 0) -> nn.Module:
    """Hugging Face BertForSequenceClassification: separate query/key/value Linears, word /
    position / token-type Embeddings, a pooler."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=2 * WIDTH, max_position_embeddings=SEQ_LEN, num_labels=NUM_CLASSES,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """Hugging Face GPT2LMHeadModel: transposed Conv1D projections (packed q/k/v in c_attn), the lm
    head tied to the token embedding."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=SEQ_LEN,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    """Hugging Face LlamaForCausalLM: RMSNorm, rotary positions, grouped-query attention (4 query
    heads sharing 2 key/value heads), gated SiLU MLP."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    return tf.LlamaForCausalLM(config).eval()


TINY_ARCHITECTURES = ("slimforge.core.testing:tiny_cnn", "slimforge.core.testing:tiny_mlp")
SEQUENCE_ARCHITECTURES = tuple(f"slimforge.core.testing:{name}" for name in
                               ("tiny_transformer", "tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_gru"))
ALL_ARCHITECTURES = TINY_ARCHITECTURES + SEQUENCE_ARCHITECTURES
TOKEN_INPUT_ARCHITECTURES = frozenset(SEQUENCE_ARCHITECTURES)


# What a tiny task feeds an architecture: "images" (1x12x12 floats), "tokens" (SEQ_LEN ids < VOCAB),
# or a callable ``(count, generator) -> Tensor`` drawing ``count`` inputs of the model's own kind.
INPUT_KINDS = ("images", "tokens")


def tiny_inputs(architecture: str, count: int, generator: torch.Generator, inputs: Any = None) -> torch.Tensor:
    """Random inputs of the kind ``architecture`` reads: ``inputs`` when given (a kind from
    ``INPUT_KINDS`` or a callable), else token ids for the built-in sequence models and 1x12x12
    images for anything else."""
    if inputs is None:
        inputs = "tokens" if architecture in TOKEN_INPUT_ARCHITECTURES else "images"
    if callable(inputs):
        return inputs(count, generator)
    if inputs == "tokens":
        return torch.randint(0, VOCAB, (count, SEQ_LEN), generator=generator)
    if inputs == "images":
        return torch.randn(count, *INPUT_SHAPE, generator=generator)
    raise ValueError(f"inputs: unknown {inputs!r}; valid choices: {', '.join(INPUT_KINDS)}, or a callable "
                     "(count, generator) -> Tensor")


def tiny_task(architecture: str = TINY_ARCHITECTURES[0], n: int = 256, seed: int = 0, inputs: Any = None) -> Task:
    """Random inputs labelled by the (seeded, untrained) teacher itself, so the teacher scores 1.0
    and any damage compression does is visible in the metric.  Language models are labelled per
    token (targets (N, SEQ_LEN)).  ``architecture`` is a ``module:function`` factory, a built-in
    one or the plugin author's own; ``inputs`` says what it reads (``tiny_inputs``)."""
    from slimforge.core.outputs import logits_of

    ref = FactoryRef(architecture)
    teacher = ref.call()
    generator = torch.Generator().manual_seed(seed)
    x = tiny_inputs(architecture, 3 * n, generator, inputs)
    with torch.no_grad():
        y = logits_of(teacher(x)).argmax(dim=-1)
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
    """Contract tests; subclass and set ``technique`` (its registered name).

    Optional: ``architectures`` (``module:function`` factories; the default is every weight kind
    below), ``inputs`` (``{architecture: kind or callable}`` for the author's own architectures:
    ``"tokens"``, ``"images"`` or ``(count, generator) -> Tensor``; built-in ones need none),
    ``suggest_seeds``.  Each ``test_*`` method takes no argument but ``self``, so the kit runs
    under pytest (``pip install 'slimforge[plugin-dev]'``) or by calling the methods directly;
    the Hugging Face architectures need transformers (in that extra)."""

    technique: ClassVar[str]
    extra_plugins: ClassVar[tuple[Any, ...]] = ()
    # Every weight kind a user's model brings: a CNN and an MLP, a torch transformer encoder, HF BERT,
    # GPT-2 and a Llama-style decoder, a GRU.  A plugin for one kind of model may narrow this.
    architectures: ClassVar[tuple[str, ...]] = ALL_ARCHITECTURES
    inputs: ClassVar[dict[str, Any]] = {}
    suggest_seeds: ClassVar[tuple[int, ...]] = (0, 1, 2)

    # --- helpers ---------------------------------------------------------------------------------
    def _plugins(self):
        from slimforge.core.manager import Plugins

        return Plugins(extra_plugins=self.extra_plugins)

    def task_for(self, architecture: str) -> Task:
        """The tiny task the contract tests use on ``architecture``."""
        return tiny_task(architecture, inputs=self.inputs.get(architecture))

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
        task = self.task_for(self.architectures[0])
        for seed in self.suggest_seeds:
            config = self._suggest(technique, task, seed)
            problem = json_round_trip_problem(type(technique), config)
            assert problem is None, f"{self.technique} (suggest seed {seed}): {problem}"

    def test_suggest_is_deterministic(self):
        technique = self._plugins().registry.get(self.technique)
        task = self.task_for(self.architectures[0])
        for seed in self.suggest_seeds:
            assert self._suggest(technique, task, seed) == self._suggest(technique, task, seed)

    def test_artifact_round_trip_is_bitwise(self):
        # A temporary folder of its own, not pytest's tmp_path: the kit's tests take only self.
        with tempfile.TemporaryDirectory() as folder:
            self._check_round_trips(Path(folder))

    def _check_round_trips(self, tmp_path: Path) -> None:
        from slimforge.core.compressed import load_model, save_model
        from slimforge.core.outputs import logits_of

        plugins = self._plugins()
        technique = plugins.registry.get(self.technique)
        for architecture in self.architectures:
            task = self.task_for(architecture)
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
                    expected, actual = logits_of(model(x)), logits_of(loaded(x))
                assert torch.equal(expected, actual), f"{architecture} seed {seed}: outputs differ after load"

    def test_acts_or_says_why(self):
        """On every architecture a technique that compresses (anything but a training-only stage)
        changes some weight, or its notes say why it could not: never a silent no-op."""
        plugins = self._plugins()
        technique = plugins.registry.get(self.technique)
        if technique.stage == Stage.TRAINING:
            return  # changes how recovery trains, not the weights apply() sees
        for architecture in self.architectures:
            task = self.task_for(architecture)
            config = self._suggest(technique, task, 0)
            ctx = TechniqueContext(task=task, seed=0)
            model = technique.apply(copy.deepcopy(task.teacher), config, ctx)
            before, after = task.teacher.state_dict(), model.state_dict()
            acted = before.keys() != after.keys() or any(
                before[k].shape != after[k].shape or not torch.equal(before[k], after[k]) for k in before)
            assert acted or ctx.notes, f"{self.technique} on {architecture}: changed no weight and noted nothing"

    def test_planner_honours_composition(self):
        from slimforge.core.planner import Planner
        from slimforge.core.space import FixedSuggester

        registry = self._plugins().registry
        planner = Planner(registry)
        task = self.task_for(self.architectures[0])
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
                if later.must_precede:
                    assert any(c.name in later.must_precede for c in classes[i + 1:]), plan.describe()
