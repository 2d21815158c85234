"""token_distillation: the top-k KL on known tensors, the cache, masking, and plan exclusivity."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.outputs import IGNORE_INDEX
from slimforge.core.recovery import TrainingBatch
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import tiny_task
from slimforge.plugins.distillation.knowledge import kl_term
from slimforge.plugins.distillation.token import (TokenDistillation, TokenDistillationConfig, TopKCache,
                                                  teacher_top_k, top_k_kl)
from slimforge.core.planner import Planner
from slimforge.core.space import FixedSuggester


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match=r"token_distillation\.top_k: must be an integer >= 1, got 0"):
        TokenDistillationConfig(top_k=0)
    with pytest.raises(ConfigError, match=r"token_distillation\.tail: unknown 'drop'; valid choices: bucket, renormalize"):
        TokenDistillationConfig(tail="drop")
    with pytest.raises(ConfigError, match=r"token_distillation\.alpha"):
        TokenDistillationConfig(alpha=1.2)
    with pytest.raises(ConfigError, match=r"token_distillation\.temperature"):
        TokenDistillationConfig(temperature=0.0)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_full_support_is_exactly_hinton_kd(tail):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 7, requires_grad=True), torch.randn(6, 7)
    log_probs, indices = teacher_top_k(teacher, top_k=50, temperature=3.0)  # k clamps to V = 7
    assert indices.shape == (6, 7) and log_probs.shape == (6, 7)
    loss = top_k_kl(student, log_probs, indices, 3.0, tail)
    assert loss.item() == pytest.approx(kl_term(student, teacher, 3.0).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_bucket_kl_matches_a_hand_computed_value():
    student = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    teacher = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    t = 2.0
    log_probs, indices = teacher_top_k(teacher, top_k=2, temperature=t)
    assert indices.tolist() == [[1, 2]]
    p, q = F.softmax(teacher / t, dim=1)[0], F.softmax(student / t, dim=1)[0]
    p3 = [p[1], p[2], p[0] + p[3]]
    q3 = [q[1], q[2], q[0] + q[3]]
    expected = sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(p3, q3)) * t**2
    assert top_k_kl(student, log_probs, indices, t, "bucket").item() == pytest.approx(expected, rel=1e-5)
    # renormalised over the support {1, 2}: the tail is ignored on both sides
    pr = [p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2])]
    qr = [q[1] / (q[1] + q[2]), q[2] / (q[1] + q[2])]
    expected = sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(pr, qr)) * t**2
    assert top_k_kl(student, log_probs, indices, t, "renormalize").item() == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    torch.manual_seed(1)
    teacher = torch.randn(10, 100)
    log_probs, indices = teacher_top_k(teacher, top_k=5, temperature=2.0)
    assert top_k_kl(teacher, log_probs, indices, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert top_k_kl(torch.randn(10, 100), log_probs, indices, 2.0).item() > 0.01
    assert log_probs.exp().sum(dim=1).allclose(torch.ones(10), atol=1e-5)  # k + 1 outcomes: a distribution


class TinyLM(nn.Module):
    """Embedding -> Linear over a 50-token vocabulary: sequence logits (N, T, V)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, x):
        return self.head(self.embed(x))


class _Task:
    def __init__(self, teacher):
        self.teacher = teacher


def test_sequence_loss_is_per_token_and_ignores_padding():
    teacher, student = TinyLM(0).eval(), TinyLM(1)
    x = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    y[1, 3:] = IGNORE_INDEX
    config = TokenDistillationConfig(alpha=0.0, temperature=2.0, top_k=4)
    technique, ctx = TokenDistillation(), TechniqueContext(task=_Task(teacher))
    technique.apply(student, config, ctx)
    outputs = student(x)
    batch = TrainingBatch(x, y, outputs, torch.arange(3), lambda: pytest.fail("the dense teacher cache is never read"))
    loss = technique.training_loss(student, batch, torch.tensor(0.0), config, ctx)
    with torch.no_grad():
        t = teacher(x)
    keep = (y != IGNORE_INDEX).reshape(-1)
    log_probs, indices = teacher_top_k(t.reshape(-1, 50)[keep], 4, 2.0)
    expected = top_k_kl(outputs.reshape(-1, 50)[keep], log_probs, indices, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The cache holds k + 1 log-probabilities and k int32 indices per token, never V floats.
    cache: TopKCache = ctx.state["top_k_cache"]
    assert len(cache.entries) == 3 and cache.nbytes() == 3 * 6 * (5 * 4 + 4 * 4)


def test_cache_runs_the_teacher_once_per_example():
    calls = []
    teacher = TinyLM(0).eval()
    teacher.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    cache = TopKCache(teacher, top_k=3, temperature=1.0)
    x = torch.randint(0, 50, (4, 5))
    first = cache.lookup(x, torch.tensor([0, 1, 2, 3]))
    again = cache.lookup(x[[2, 0]], torch.tensor([2, 0]))
    assert calls == [4]
    assert torch.equal(again[0], first[0][[2, 0]]) and torch.equal(again[1], first[1][[2, 0]])


def test_works_on_a_classifier_and_trains_it_towards_the_teacher():
    from slimforge.core.plan import Recovery
    from slimforge.core.recovery import AppliedStep, recover
    from slimforge.core.testing import tiny_mlp

    task = tiny_task("slimforge.core.testing:tiny_mlp")
    student = tiny_mlp(seed=3)
    config = TokenDistillationConfig(alpha=0.0, temperature=2.0, top_k=2)
    technique, ctx = TokenDistillation(), TechniqueContext(task=task)
    technique.apply(student, config, ctx)
    x = task.split("train")[:][0]
    with torch.no_grad():
        before = kl_term(student(x), task.teacher(x), 2.0).item()
    recover(student, [AppliedStep(technique, config, ctx)], task.split("train"), Recovery(epochs=3, lr=3e-3))
    with torch.no_grad():
        after = kl_term(student(x), task.teacher(x), 2.0).item()
    assert after < 0.5 * before


def test_a_plan_never_holds_two_distillation_techniques():
    registry = Plugins(load_entry_points=False).registry
    planner = Planner(registry, ["knowledge_distillation", "token_distillation", "hint_distillation",
                                 "magnitude_pruning"])
    task = tiny_task()
    seen = set()
    for seed in range(40):
        names = planner.sample(FixedSuggester(seed=seed), task, seed).technique_names
        assert sum(name.endswith("distillation") for name in names) <= 1, names
        seen.update(names)
    assert {"knowledge_distillation", "token_distillation", "hint_distillation"} <= seen
