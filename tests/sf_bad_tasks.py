"""Task factories that are wrong in the ways user code is, for tests/test_bad_input.py.  Configs name
them as ``sf_bad_tasks:NAME``; the tiny task's model and data (``sf_testing_models``) fill the rest."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import sf_testing_models


def not_a_module():
    """A model factory that returns a state_dict instead of the model."""
    return sf_testing_models.trained_tiny_cnn().state_dict()


def three_channel_splits():
    """Images with 3 channels for a model whose first layer takes 1."""
    return {name: TensorDataset(x.expand(-1, 3, -1, -1).contiguous(), y)
            for name, (x, y) in ((n, d.tensors) for n, d in sf_testing_models.tiny_splits().items())}


def empty_val_splits():
    splits = sf_testing_models.tiny_splits()
    x, y = splits["val"].tensors
    splits["val"] = TensorDataset(x[:0], y[:0])
    return splits


def splits_without_test():
    splits = sf_testing_models.tiny_splits()
    del splits["test"]
    return splits


def splits_as_a_list():
    return list(sf_testing_models.tiny_splits().values())


def nan_metric(outputs, targets) -> float:
    return float("nan")


def raising_metric(outputs, targets) -> float:
    raise ValueError("targets must be one-hot")


def one_hot_splits():
    """Targets one-hot encoded where the metric expects class indices."""
    return {name: TensorDataset(x, torch.nn.functional.one_hot(y, 4).float())
            for name, (x, y) in ((n, d.tensors) for n, d in sf_testing_models.tiny_splits().items())}


def float_label_splits():
    """Class labels stored as floats (0.0, 1.0, ...): the accuracy works, the training loss does not."""
    return {name: TensorDataset(x, y.float())
            for name, (x, y) in ((n, d.tensors) for n, d in sf_testing_models.tiny_splits().items())}


def label_out_of_range_splits():
    """A label the 4-class model has no score for."""
    splits = sf_testing_models.tiny_splits()
    x, y = splits["train"].tensors
    y = y.clone()
    y[0] = 7
    splits["train"] = TensorDataset(x, y)
    return splits
