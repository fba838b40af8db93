"""The compressed denoiser under torch.compile (issue 16): slimdiff's processors add no graph breaks,
and every traced attention call passes q, k and v of one head width, so the compiled graph runs
the same fused SDPA kernel eager mode does. Reference: the uncompressed model traced the same way."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from compress_helpers import capture_covariances, unet_inputs
from conftest import make_tiny_unet

from slimdiff.families.units import compression_units
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.compress import compress_


def _untied(unet):
    covs = capture_covariances(unet, [unet_inputs(unet, seed=1)])
    units = compression_units(unet)
    # QK at 8, VO and FFN at half: untied (8 vs 16) where d_h = 32, tied at 8 where d_h = 16
    ranks = {n: 8 if u.kind == "qk" else u.full_rank // 2 for n, u in units.items()}
    slim = copy.deepcopy(unet)
    compress_(slim, RankPlan.from_ranks(units, ranks), covs)
    return slim


def _sdpa_head_dims(explanation) -> list[tuple[int, int, int]]:
    dims = []
    for graph in explanation.graphs:
        for node in graph.graph.nodes:
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                q, k, v = (node.args[i].meta["example_value"] for i in range(3))
                dims.append((q.shape[-1], k.shape[-1], v.shape[-1]))
    return dims


@pytest.mark.slow  # ~25 s: two dynamo traces
def test_compressed_unet_compiles_without_graph_breaks_and_with_tied_sdpa_widths():
    unet = make_tiny_unet(heads=2)
    slim = _untied(unet)
    x = unet_inputs(unet, seed=2)
    torch._dynamo.reset()
    before = torch._dynamo.explain(unet)(*x)
    torch._dynamo.reset()
    after = torch._dynamo.explain(slim)(*x)
    assert after.graph_break_count == before.graph_break_count == 0, [
        str(r.reason) for r in after.break_reasons
    ]
    dims = _sdpa_head_dims(after)
    assert len(dims) == len(_sdpa_head_dims(before)) > 0
    assert all(q == k == v for q, k, v in dims), dims  # padded to one width inside the graph
    assert any(q < 16 for q, _, _ in dims)  # and really compressed (the tiny UNet's d_h are 16 and 32)
