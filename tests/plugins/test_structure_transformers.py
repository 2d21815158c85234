"""Structured pruning and parameter distillation on transformers and RNNs: whole attention heads
(grouped-query groups kept consistent), FFN channels, the hidden width and positions untouched,
dropped blocks, and artifacts that rebuild all of it."""

import copy

import pytest
import torch
from torch import nn

from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.outputs import logits_of
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import compress, tiny_task
from slimforge.plugins.distillation.student import (ParameterDistillation, ParameterDistillationConfig, block_lists,
                                                    kept_blocks)
from slimforge.plugins.pruning.heads import HeadPrunedMultiheadAttention
from slimforge.plugins.pruning.structured import StructuredPruning, StructuredPruningConfig

pytest.importorskip("transformers")

ARCH = "slimforge.core.testing:"


@pytest.fixture(params=["structured_pruning", "parameter_distillation"])
def technique_name(request):
    return request.param


def _prune(architecture, sparsity=0.5, criterion="magnitude"):
    task = tiny_task(ARCH + architecture)
    ctx = TechniqueContext(task=task)
    model = StructuredPruning().apply(copy.deepcopy(task.teacher), StructuredPruningConfig(
        channel_sparsity=sparsity, criterion=criterion), ctx)
    return task, model.eval(), ctx


def _round_trip(task, model, steps, structures, path):
    plugins = Plugins(load_entry_points=False)
    plan = Plan(steps=tuple(PlanStep(t.name, t.config_to_dict(c)) for t, c in steps), seed=0)
    size = save_model(model, path, task=task, plan=plan, structure=structures)
    loaded = load_model(path, plugins.registry).model
    x = task.split("val")[:][0][:8]
    with torch.inference_mode():
        assert torch.equal(logits_of(model(x)), logits_of(loaded(x)))
    return size, loaded


def _rows_of(small, big):
    """Index in ``big`` of every row of ``small`` (each must be an exact copy)."""
    return [next(i for i in range(big.shape[0]) if torch.equal(row, big[i])) for row in small]


def test_bert_heads_are_removed_whole_and_ffn_narrowed(tmp_path):
    task, model, ctx = _prune("tiny_bert")
    teacher = task.teacher
    attn = model.bert.encoder.layer[0].attention
    assert attn.self.num_attention_heads == 2 and attn.self.all_head_size == 16
    assert attn.self.query.weight.shape == attn.self.key.weight.shape == attn.self.value.weight.shape == (16, 32)
    assert attn.output.dense.weight.shape == (32, 16)  # the output projection lost the same heads' columns
    rows = _rows_of(attn.self.query.weight, teacher.bert.encoder.layer[0].attention.self.query.weight)
    heads = sorted({r // 8 for r in rows})
    assert len(heads) == 2 and rows == [h * 8 + j for h in heads for j in range(8)], "whole heads, in order"
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (32, 32)  # FFN 64 -> 32
    # The hidden width, the embeddings and the position embeddings are untouched.
    assert model.bert.embeddings.word_embeddings.weight.shape == (64, 32)
    assert model.bert.embeddings.position_embeddings.weight.shape == (16, 32)
    assert attn.output.dense.weight.shape[0] == 32
    assert ctx.structure["heads"]["bert.encoder.layer.0.attention.self"] == [2, 2]
    _, loaded = _round_trip(task, model, [(StructuredPruning(), StructuredPruningConfig(channel_sparsity=0.5))],
                               [ctx.structure], tmp_path / "b.slim")
    assert loaded.bert.encoder.layer[1].attention.self.num_attention_heads == 2


def test_llama_grouped_query_heads_stay_in_consistent_groups(tmp_path):
    task, model, ctx = _prune("tiny_llama", criterion="taylor")
    teacher_attn = task.teacher.model.layers[0].self_attn
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.o_proj.weight.shape == (32, 16)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 32)  # both shared k/v heads kept
    assert torch.equal(attn.k_proj.weight, teacher_attn.k_proj.weight)
    assert attn.num_heads == 2 and attn.num_key_value_heads == 2 and attn.num_key_value_groups == 1
    q_heads = sorted({r // 8 for r in _rows_of(attn.q_proj.weight, teacher_attn.q_proj.weight)})
    assert [h // 2 for h in q_heads] == [0, 1], "one query head of each key/value group"
    assert model.model.layers[0].mlp.gate_proj.weight.shape == model.model.layers[0].mlp.up_proj.weight.shape == (32, 32)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
    assert any("key/value heads are kept" in n for n in ctx.notes)
    _round_trip(task, model, [(StructuredPruning(), StructuredPruningConfig(channel_sparsity=0.5, criterion="taylor"))],
                [ctx.structure], tmp_path / "l.slim")


def test_gpt2_packed_conv1d_heads_and_mlp(tmp_path):
    task, model, ctx = _prune("tiny_gpt2")
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (32, 48) and attn.c_attn.nf == 48  # q|k|v of 2 heads each, transposed
    assert attn.num_heads == 2 and attn.split_size == 16 and attn.c_proj.weight.shape == (16, 32)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)  # 128 -> 64 FFN channels
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives
    assert ctx.structure["shapes"]["transformer.h.0.attn.c_attn"] == [32, 48]
    _round_trip(task, model, [(StructuredPruning(), StructuredPruningConfig(channel_sparsity=0.5))],
                [ctx.structure], tmp_path / "g.slim")


def test_torch_transformer_keeps_pos_and_prunes_heads(tmp_path):
    task, model, ctx = _prune("tiny_transformer", criterion="fisher")
    attn = model.encoder.layers[0].self_attn
    assert type(attn) is HeadPrunedMultiheadAttention and attn.num_heads == 2
    assert attn.in_proj_weight.shape == (48, 32) and attn.out_proj.weight.shape == (32, 16)
    assert model.pos.shape == task.teacher.pos.shape
    assert model.encoder.layers[0].linear1.weight.shape == (32, 32)
    assert any("'pos'" in n and "left whole" in n for n in ctx.notes)
    _round_trip(task, model, [(StructuredPruning(), StructuredPruningConfig(channel_sparsity=0.5, criterion="fisher"))],
                [ctx.structure], tmp_path / "t.slim")


def test_head_pruned_attention_computes_what_multihead_attention_does():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    pruned = copy.deepcopy(reference)
    pruned.__class__ = HeadPrunedMultiheadAttention  # all heads kept: must be the same function
    x = torch.randn(3, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    for kwargs in ({}, {"attn_mask": causal}, {"key_padding_mask": padding}, {"attn_mask": causal, "need_weights": False}):
        with torch.no_grad():
            want_out, want_w = reference(x, x, x, **kwargs)
            got_out, got_w = pruned(x, x, x, **kwargs)
        assert torch.allclose(want_out, got_out, atol=1e-5)
        assert (want_w is None) == (got_w is None) and (want_w is None or torch.allclose(want_w, got_w, atol=1e-5))


def test_the_weakest_head_goes_first():
    task = tiny_task(ARCH + "tiny_bert")
    teacher = copy.deepcopy(task.teacher)
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            for proj in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                proj.weight[16:24] *= 1e-3  # head 2 is nearly zero everywhere
    weak = teacher.bert.encoder.layer[0].attention.self.query.weight[16].clone()
    model = StructuredPruning().apply(teacher, StructuredPruningConfig(channel_sparsity=0.25), TechniqueContext(task=task))
    query = model.bert.encoder.layer[0].attention.self.query.weight
    assert query.shape == (24, 32)
    assert not any(torch.equal(row, weak) for row in query)


def test_gru_hidden_units_are_noted_not_pruned():
    _, model, ctx = _prune("tiny_gru")
    assert model.rnn.weight_hh_l0.shape == (96, 32)
    assert any("RNN hidden units of 'rnn' not pruned structurally" in n for n in ctx.notes)


# --- parameter distillation: depth ---------------------------------------------------------------

def test_kept_blocks_are_evenly_spaced_from_the_first():
    assert kept_blocks(12, 0.5) == [0, 2, 4, 6, 8, 10]
    assert kept_blocks(12, 0.25) == [0, 4, 8]
    assert kept_blocks(2, 0.5) == [0] and kept_blocks(2, 0.25) == [0] and kept_blocks(4, 1.0) == [0, 1, 2, 3]


@pytest.mark.parametrize("architecture,stack", [("tiny_bert", "bert.encoder.layer"), ("tiny_gpt2", "transformer.h"),
                                                ("tiny_llama", "model.layers"), ("tiny_transformer", "encoder.layers")])
def test_student_drops_blocks_initialised_from_the_teacher(architecture, stack, tmp_path):
    task = tiny_task(ARCH + architecture)
    assert list(block_lists(task.teacher)) == [stack]
    config = ParameterDistillationConfig(width=0.5, depth=0.5)
    model, ctx = compress(ParameterDistillation(), config, task, recovery_steps=0)
    blocks = model.get_submodule(stack)
    assert len(blocks) == 1 and ctx.structure["blocks"] == {stack: [0]}
    teacher_block = task.teacher.get_submodule(stack)[0]
    for name, p in blocks[0].named_parameters():  # kept parameters are slices of the teacher's block
        t = teacher_block.get_parameter(name)
        assert p.dim() == t.dim() and all(a <= b for a, b in zip(p.shape, t.shape, strict=True))
    _round_trip(task, model, [(ParameterDistillation(), config)], [ctx.structure], tmp_path / "s.slim")


def test_student_suggests_depth_only_where_blocks_exist():
    from slimforge.core.space import FixedSuggester, scoped

    cnn = tiny_task()
    bert = tiny_task(ARCH + "tiny_bert")
    for seed in range(8):
        assert ParameterDistillation().suggest(scoped(FixedSuggester(seed=seed), "parameter_distillation"), cnn).depth == 1.0
    depths = {ParameterDistillation().suggest(scoped(FixedSuggester(seed=s), "parameter_distillation"), bert).depth
              for s in range(16)}
    assert depths <= {0.25, 0.5, 0.75, 1.0} and len(depths) > 1


@pytest.mark.parametrize("architecture", ["tiny_bert", "tiny_transformer", "tiny_llama"])
def test_structured_pruning_after_a_shallower_student_restores_both(architecture, tmp_path):
    task = tiny_task(ARCH + architecture)
    student_config = ParameterDistillationConfig(width=0.75, depth=0.5)
    prune_config = StructuredPruningConfig(channel_sparsity=0.5, criterion="taylor")
    student_ctx, prune_ctx = TechniqueContext(task=task), TechniqueContext(task=task)
    model = ParameterDistillation().apply(copy.deepcopy(task.teacher), student_config, student_ctx)
    model = StructuredPruning().apply(model, prune_config, prune_ctx).eval()
    _round_trip(task, model, [(ParameterDistillation(), student_config), (StructuredPruning(), prune_config)],
                [student_ctx.structure, prune_ctx.structure], tmp_path / "sp.slim")


def test_pruned_sites_describe_the_new_head_structure():
    from slimforge.core.sites import weight_sites

    _, model, _ = _prune("tiny_transformer")
    sites = weight_sites(model)
    in_proj = sites["encoder.layers.0.self_attn.in_proj_weight"]
    assert in_proj.shape == (48, 32) and in_proj.row_blocks == (16, 16, 16) and in_proj.row_heads == (2, 2, 2)
    assert sites["encoder.layers.0.self_attn.out_proj.weight"].col_heads == 2
    _, llama, _ = _prune("tiny_llama")
    sites = weight_sites(llama)
    assert sites["model.layers.0.self_attn.q_proj.weight"].row_heads == (2,)
    assert sites["model.layers.0.self_attn.k_proj.weight"].row_heads == (2,)
