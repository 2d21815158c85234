"""Knowledge and parameter distillation: loss values on known tensors, copied weights, training."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from slimforge.core.errors import ConfigError
from slimforge.core.plan import Recovery
from slimforge.core.recovery import AppliedStep, TeacherOutputs, TrainingBatch, recover
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import tiny_task
from slimforge.plugins.common import weight_layers
from slimforge.plugins.distillation.knowledge import (KnowledgeDistillation, KnowledgeDistillationConfig, kl_term,
                                                      mse_term)
from slimforge.plugins.distillation.student import ParameterDistillation, ParameterDistillationConfig


def test_kl_term_matches_hand_computed_value():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0]])
    temperature = 2.0
    p_t = torch.softmax(teacher / temperature, dim=1)[0]
    p_s = torch.softmax(student / temperature, dim=1)[0]
    expected = float(sum(p_t[i] * math.log(p_t[i] / p_s[i]) for i in range(2))) * temperature**2
    assert kl_term(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert kl_term(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-7)


def test_mse_term_matches_hand_computed_value():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert mse_term(student, teacher).item() == pytest.approx((4 + 9) / 4)


@pytest.mark.parametrize("term", ["kl", "mse"])
def test_training_loss_mixes_label_loss_and_distillation_term(term):
    config = KnowledgeDistillationConfig(alpha=0.3, temperature=3.0, term=term)
    outputs = torch.tensor([[2.0, -1.0, 0.5]])
    teacher = torch.tensor([[0.5, 1.0, -1.0]])
    ce = F.cross_entropy(outputs, torch.tensor([0]))
    batch = TrainingBatch(torch.zeros(1), torch.tensor([0]), outputs, torch.tensor([0]), lambda: teacher)
    mixed = KnowledgeDistillation().training_loss(None, batch, ce, config, None)
    distill = kl_term(outputs, teacher, 3.0) if term == "kl" else mse_term(outputs, teacher)
    assert mixed.item() == pytest.approx(0.3 * ce.item() + 0.7 * distill.item(), rel=1e-6)


def test_kd_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="term: unknown 'cosine'; valid choices: kl, mse"):
        KnowledgeDistillationConfig(term="cosine")
    with pytest.raises(ConfigError, match="alpha"):
        KnowledgeDistillationConfig(alpha=1.5)


def test_teacher_outputs_are_cached_per_example():
    task = tiny_task()
    cache = TeacherOutputs(task.teacher, task.split("train"))
    x = task.split("train")[:][0]
    idx = torch.tensor([5, 0, 17])
    with torch.inference_mode():
        assert torch.allclose(cache[idx], task.teacher(x[idx]), atol=1e-6)
    assert cache.all() is cache.all()  # one teacher pass, reused


def test_student_keeps_the_teachers_most_important_weights():
    task = tiny_task("slimforge.core.testing:tiny_mlp")
    teacher = task.teacher
    ctx = TechniqueContext(task=task)
    student = ParameterDistillation().apply(copy.deepcopy(teacher), ParameterDistillationConfig(width=0.25), ctx)
    t_layers, s_layers = weight_layers(teacher), weight_layers(student)
    first_t, first_s = t_layers["1"].weight, s_layers["1"].weight
    assert first_s.shape == (16, 144)  # 64 neurons at width 0.25
    # Every kept neuron is a teacher neuron, copied exactly, and the next layer keeps exactly the
    # matching input columns (Torch-Pruning ranks a neuron by its coupled group's L1 norm).
    def rows_in(small, big):
        return [next(i for i in range(big.shape[0]) if torch.equal(row, big[i])) for row in small]

    kept_1 = rows_in(first_s, first_t)
    assert len(set(kept_1)) == 16
    second_t, second_s = t_layers["3"].weight[:, kept_1], s_layers["3"].weight
    kept_3 = rows_in(second_s, second_t)
    assert len(set(kept_3)) == second_s.shape[0] == 8
    assert s_layers["5"].weight.shape[0] == 5  # classifier outputs untouched
    assert ctx.structure["shapes"]["1"] == [16, 144]


def test_kd_recovery_moves_the_student_towards_the_teacher():
    task = tiny_task("slimforge.core.testing:tiny_mlp")
    ctx = TechniqueContext(task=task)
    student = ParameterDistillation().apply(copy.deepcopy(task.teacher), ParameterDistillationConfig(width=0.5), ctx)
    kd = AppliedStep(KnowledgeDistillation(), KnowledgeDistillationConfig(alpha=0.0, temperature=2.0, term="mse"), ctx)
    teacher_outputs = TeacherOutputs(task.teacher, task.split("train"))
    x = task.split("train")[:][0]
    with torch.inference_mode():
        before = mse_term(student(x), teacher_outputs.all()).item()
    log = recover(student, [kd], task.split("train"), Recovery(epochs=3, lr=3e-3), teacher_outputs=teacher_outputs)
    with torch.inference_mode():
        after = mse_term(student(x), teacher_outputs.all()).item()
    assert after < 0.5 * before
    assert len(log.losses) == 3 and log.losses[-1] < log.losses[0]
