"""MLflow pyfunc model around a slimforge artifact ("models from code": nothing is pickled).

MLflow copies this file next to the artifact when a Pareto member is logged, and runs it when the
model is loaded, so ``mlflow.pyfunc.load_model("models:/NAME@alias").predict(batch)`` works in a
process that never imported the search.  Input: an array shaped like the task's inputs (N, ...),
float32, or int64 for token ids; output: the model's logits (N, classes), or (N, T, vocab) for a
sequence model.
"""

from __future__ import annotations

import mlflow
import numpy as np

ARTIFACT_KEY = "slimforge_artifact"


class SlimforgeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from slimforge.core.compressed import load_model
        from slimforge.core.manager import Plugins

        # Loading an MLflow model runs its code (this file) anyway: trusting the model is trusting
        # the factory its artifact names (see slimforge.core.trust).
        self._loaded = load_model(context.artifacts[ARTIFACT_KEY], Plugins().registry, trusted=True)
        self._input_shape = tuple(self._loaded.meta["example_input"]["shape"][1:])
        # Token ids stay integers (an Embedding refuses floats); everything else is float32.
        integer = self._loaded.meta["example_input"].get("dtype") in ("int64", "int32")
        self._input_dtype = np.int64 if integer else np.float32

    # The ndarray hint is one MLflow accepts without inferring a schema from it (the signature is
    # logged explicitly); with no hint at all MLflow warns on every load.
    def predict(self, context, model_input: np.ndarray, params=None):
        import torch

        from slimforge.core.outputs import logits_of

        array = np.asarray(model_input.values if hasattr(model_input, "values") else model_input, dtype=self._input_dtype)
        batch = torch.from_numpy(array.reshape((-1, *self._input_shape)))
        with torch.inference_mode():
            return logits_of(self._loaded.model(batch)).float().numpy()


mlflow.models.set_model(SlimforgeModel())
