"""Test helpers for compression: a minimal covariance capture on tiny UNets (independent of the
calibration module), fixed inputs, and a module-input recorder."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from slimdiff.families.units import compression_units

F64 = torch.float64


def unet_inputs(unet, batch: int = 2, size: int = 8, text_len: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(batch, text_len, unet.config.cross_attention_dim, generator=g)
    timesteps = torch.tensor([10 + 300 * i for i in range(batch)])
    return sample, timesteps, text


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


def capture_covariances(unet, inputs_list) -> dict[str, torch.Tensor]:
    """Token-averaged second moments with the keys and shapes of ActivationStats.aggregate."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    hooks = []

    def add(key: str, x: torch.Tensor, heads: int | None) -> None:
        x = x.detach().to(F64).reshape(-1, x.shape[-1])  # (tokens, features)
        if heads is None:
            m = x.T @ x
        else:
            xh = x.view(x.shape[0], heads, -1)  # (tokens, H, d_h)
            m = torch.einsum("nhd,nhe->hde", xh, xh)
        sums[key] = sums[key] + m if key in sums else m
        counts[key] += x.shape[0]

    for u in compression_units(unet).values():  # the layouts say which linears to hook
        lay = u.layout
        if u.kind == "ffn":
            hooks.append(
                unet.get_submodule(lay.proj_out).register_forward_pre_hook(
                    lambda m, a, k=lay.hidden_key: add(k, a[0], None)
                )
            )
        elif u.kind == "qk":
            for path, key in [*((p, lay.query_key) for p in lay.query), *((p, lay.key_key) for p in lay.key)]:
                hooks.append(
                    unet.get_submodule(path).register_forward_hook(
                        lambda m, a, o, k=key, h=lay.heads: add(k, o, h)
                    )
                )
        else:
            for path in lay.out:
                hooks.append(
                    unet.get_submodule(path).register_forward_pre_hook(
                        lambda m, a, k=lay.attnout_key, h=lay.heads: add(k, a[0], h)
                    )
                )
    try:
        for inputs in inputs_list:
            run(unet, inputs)
    finally:
        for hk in hooks:
            hk.remove()
    return {k: v / counts[k] for k, v in sums.items()}


def record_module_io(unet, inputs, module_types: tuple[type, ...]) -> dict[str, tuple]:
    """(args, kwargs, output) of every module of the given types during one forward."""
    records = {}
    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, module_types):

            def hook(mod, args, kwargs, out, name=name):
                records[name] = (
                    tuple(a.clone() if torch.is_tensor(a) else a for a in args),
                    {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                    out.clone(),
                )

            hooks.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        run(unet, inputs)
    finally:
        for hk in hooks:
            hk.remove()
    return records


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linear_shapes(unet: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
