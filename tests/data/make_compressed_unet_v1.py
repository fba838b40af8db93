"""Wrote tests/data/compressed_unet_v1 with the sidecar-only format of slimdiff before config-carried plans
(stock config class + slimdiff.json; commit 8f64a1c). Kept to show how the fixture was made; rerunning it with
a newer slimdiff writes the newer format."""
import sys, torch
sys.path.insert(0, "tests")
torch.set_num_threads(1)
from conftest import make_tiny_unet
from compress_helpers import capture_covariances, unet_inputs
from safetensors.torch import save_file
from slimdiff.families.units import compression_units
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.compress import compress_
from slimdiff.formats.io import save_compressed
unet = make_tiny_unet(heads=2, block_out_channels=(16, 32))
covs = capture_covariances(unet, [unet_inputs(unet, seed=1)])
units = compression_units(unet)
ranks = {n: u.full_rank // 2 for n, u in units.items()}
compress_(unet, RankPlan.from_ranks(units, ranks), covs)
out = "tests/data/compressed_unet_v1"
save_compressed(unet, out)
x = unet_inputs(unet, seed=7)
with torch.no_grad(): y = unet(*x).sample
save_file({"sample": x[0], "timesteps": x[1], "text": x[2], "output": y}, "tests/data/compressed_unet_v1_reference.safetensors")
