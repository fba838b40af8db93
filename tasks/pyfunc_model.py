"""The registry's pyfunc model, logged with MLflow's models-from-code.

``tasks.tracking.register_compressed`` passes this file's PATH as ``python_model``: MLflow copies
the source into the logged model (``code/pyfunc_model.py``) and runs it when the model is loaded,
so the registry holds readable code and the diffusers folder, never a pickled object. The compressed
pipeline itself is the plain artifact ``pipeline`` (safetensors + JSON), loaded by
``slimdiff.formats.io.load_compressed``. Keep this file self-contained: MLflow executes it on its own, not
as part of the ``tasks`` package.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class SlimDiffPipelineModel(PythonModel):
    """pyfunc wrapper so the registry can serve the model: predict(prompts) -> images, the contract
    of ``tasks.tracking.PYFUNC_SIGNATURE`` (logged with it): a string column "prompt" in, uint8
    images (N, H, W, 3) out; optional params num_inference_steps, guidance_scale, seed (None: the
    pipeline's default).

    For Python use, ``tasks.tracking.load_registered_pipeline`` returns the diffusers pipeline itself."""

    def load_context(self, context) -> None:
        from slimdiff.formats.io import load_compressed

        self.pipeline = load_compressed(context.artifacts["pipeline"])

    # the DataFrame hint says "validate against the logged signature": MLflow infers no schema from it
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import torch

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        kwargs = {k: v for k, v in (params or {}).items() if v is not None}
        seed = kwargs.pop("seed", None)
        if seed is not None:
            kwargs["generator"] = torch.Generator().manual_seed(int(seed))
        out = self.pipeline(prompts, output_type="np", **kwargs)
        return (np.asarray(out.images) * 255).round().astype(np.uint8)


mlflow.models.set_model(SlimDiffPipelineModel())
