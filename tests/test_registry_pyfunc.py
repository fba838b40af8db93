"""The registered model as MLflow stores it (issue 27): a models-from-code pyfunc, so the registry
holds source code and the diffusers folder, no pickle; an explicit signature; no warnings while
registering; and it loads back both ways, as a pyfunc (mlflow.pyfunc.load_model, with the
images of the pipeline itself) and as the diffusers pipeline (load_registered_pipeline)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import tiny_toy_pipeline

from slimdiff.config import Params

PROMPT = "a red circle on the left"


@pytest.fixture
def tracked(tmp_path):
    from tasks.tracking import setup_tracking

    params = Params().with_overrides(
        {
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.artifact_root": str(tmp_path / "artifacts"),
        }
    )
    setup_tracking(params)
    return params


@pytest.fixture
def compressed_dir(tmp_path) -> Path:
    """A tiny toy-world pipeline with one FFN cut to rank 8 (weight-only baseline), saved."""
    from slimdiff.families.units import compression_units
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.plan import RankPlan
    from slimdiff.surgery.compress import compress_

    pipe = tiny_toy_pipeline()
    units = compression_units(pipe.unet)
    ffn = next(n for n, u in units.items() if u.kind == "ffn")
    compress_(pipe.unet, RankPlan.from_ranks(units, {ffn: 8}), None, method="baseline")
    return save_compressed(pipe, tmp_path / "pipeline")


def _register(params, pipeline_dir):
    import mlflow

    from tasks import tracking

    with mlflow.start_run():
        return tracking.register_compressed(
            params,
            source_short_name="toy",
            pipeline_dir=pipeline_dir,
            lineage={"compressed_digest": "d" * 64, "source_digest": "s" * 64},
            gate_passed=True,
            gate_reasons=[],
            trigger="committed",
        )


def test_registration_logs_code_not_a_pickle_with_a_signature_and_no_warnings(
    tracked, compressed_dir, caplog
):
    import mlflow
    from mlflow.models import Model

    from tasks.tracking import PYFUNC_SIGNATURE

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        reg = _register(tracked, compressed_dir)
    assert (reg["version"], reg["new_version"], reg["alias"]) == ("1", True, "champion")
    # nothing to warn about in a normal registration (before: CloudPickle and "no signature" warnings)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/slimdiff-toy/1"))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not any(f.endswith((".pkl", ".pickle", ".cloudpickle")) for f in files), files
    assert "python_model.pkl" not in files and "pyfunc_model.py" in files
    assert "artifacts/pipeline/model_index.json" in files and "artifacts/pipeline/slimdiff.json" in files
    model = Model.load(str(local / "MLmodel"))
    assert model.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert model.signature == PYFUNC_SIGNATURE
    assert model.signature.inputs.input_names() == ["prompt"]
    assert (local / "pyfunc_model.py").read_bytes() == (
        Path(__file__).resolve().parent.parent / "tasks" / "pyfunc_model.py"
    ).read_bytes()


def test_registered_model_loads_as_pyfunc_and_as_pipeline_with_the_same_images(tracked, compressed_dir):
    """Both loading paths give the saved pipeline's own images for the same seed, bit for bit."""
    import mlflow
    import pandas as pd

    from slimdiff.formats.io import load_compressed
    from tasks.tracking import load_registered_pipeline

    _register(tracked, compressed_dir)
    kw = {"num_inference_steps": 2, "guidance_scale": 4.0}
    direct = load_compressed(compressed_dir)
    direct.set_progress_bar_config(disable=True)
    ref = direct([PROMPT, PROMPT], generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    ref = (np.asarray(ref) * 255).round().astype(np.uint8)

    pyfunc = mlflow.pyfunc.load_model("models:/slimdiff-toy@champion")
    assert pyfunc.metadata.get_input_schema().input_names() == ["prompt"]
    with torch.no_grad():
        images = pyfunc.predict(pd.DataFrame({"prompt": [PROMPT, PROMPT]}), params={**kw, "seed": 3})
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == ref.shape
    assert np.array_equal(images, ref)
    assert not np.array_equal(images[0], np.zeros_like(images[0]))

    pipe = load_registered_pipeline("slimdiff-toy/1", tracked)
    pipe.set_progress_bar_config(disable=True)
    again = pipe([PROMPT, PROMPT], generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    assert np.array_equal((np.asarray(again) * 255).round().astype(np.uint8), ref)
