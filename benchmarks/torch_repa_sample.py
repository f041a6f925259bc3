"""The reference's sampling loops in plain PyTorch: the baseline `bench_sample.py` times.

Transcribed from what sihyun-yu/REPA's `generate.py` runs per batch (its `samplers.py`):
`euler_sampler` (the ODE) and `euler_maruyama_sampler` (the SDE). As there, the state is
carried in float64, the model is called in the latents' dtype (float32), guidance
`u + w (c - u)` applies only at grid times t with low <= t <= high, and only those steps call
the model on the doubled batch (conditional, then null labels); elsewhere one conditional
call. The SDE's last step is deterministic.

The network is the torch SiT of `torch_repa_step.py` (SDPA attention). It takes weights in the
reference's state-dict layout (`repa_eqx.pretrained.official.official_state_dict` of our
model), so both sides run the same numbers. bf16 runs the forward under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as accelerate's mixed precision does in the
reference's training; the sampler's arithmetic stays float64.

Differences from the reference, each in its favour or neutral: the reference's SiT also
computes its projector's outputs on every call and discards them in sampling (`project=True`
restores that), and generate.py's default attention is the unfused one (`--fused-attn` off),
where this uses SDPA. For comparison only: the library never imports this file.
"""

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch_repa_step import REPASiT, architecture  # noqa: F401 (re-exported for the bench and tests)

# Reference state-dict names -> REPASiT's (prefix renames; the rest of a name is kept).
_RENAMES = (
    ("x_embedder.proj.", "patch."),
    ("t_embedder.mlp.", "t_mlp."),
    ("y_embedder.embedding_table.", "label_table."),
    ("final_layer.adaLN_modulation.1.", "final_adaln."),
    ("final_layer.linear.", "final_linear."),
    ("projectors.0.", "projector."),
)
_BLOCK_RENAMES = {
    "attn.qkv.": "qkv.",
    "attn.proj.": "proj.",
    "mlp.fc1.": "fc1.",
    "mlp.fc2.": "fc2.",
    "adaLN_modulation.1.": "adaln.",
}


def _rename(name: str) -> str:
    for theirs, ours in _RENAMES:
        if name.startswith(theirs):
            return ours + name.removeprefix(theirs)
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        for theirs, ours in _BLOCK_RENAMES.items():
            if rest.startswith(theirs):
                return f"blocks.{index}.{ours}{rest.removeprefix(theirs)}"
    raise KeyError(f"no REPASiT tensor for the reference's {name!r}")


def sit_from_reference_state(
    state: Mapping[str, np.ndarray],
    *,
    depth: int,
    hidden_size: int,
    num_heads: int,
    encoder_depth: int,
    input_size: int,
    patch_size: int,
    in_channels: int,
    num_classes: int,
    z_dim: int,
    projector_dim: int,
) -> REPASiT:
    """A REPASiT in eval mode with every tensor of `state` (the reference's names; its frozen
    `pos_embed` is the table REPASiT builds itself and is not loaded)."""
    sit = REPASiT(
        depth=depth,
        hidden_size=hidden_size,
        num_heads=num_heads,
        encoder_depth=encoder_depth,
        input_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=num_classes,
        z_dim=z_dim,
        projector_dim=projector_dim,
    )
    params = sit.state_dict()
    names = {_rename(k): k for k in state if k != "pos_embed"}
    if set(names) != set(params):
        raise KeyError(
            f"state dict does not fit: missing {sorted(set(params) - set(names))}, "
            f"unexpected {sorted(names[k] for k in set(names) - set(params))}"
        )
    with torch.no_grad():
        for ours, theirs in names.items():  # one tensor at a time: SiT-XL/2 is 2.7 GB
            params[ours].copy_(torch.from_numpy(np.array(state[theirs], np.float32)))
    return sit.eval().requires_grad_(False)


Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def velocity_model(sit: REPASiT, precision: str = "fp32", project: bool = False) -> Model:
    """sit's velocity as the samplers call it, under bf16 autocast for "bf16"."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}")

    def call(x, t, y):
        if precision == "fp32":
            return sit(x, t, y, project=project)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sit(x, t, y, project=project)[0]

    return call


def _guided(t_cur: torch.Tensor, cfg_scale: float, low: float, high: float) -> bool:
    return bool(cfg_scale > 1.0 and t_cur <= high and t_cur >= low)


def _inputs(x_cur, y, y_null, guided):
    if guided:
        return torch.cat([x_cur] * 2, dim=0), torch.cat([y, y_null], dim=0)
    return x_cur, y


def _mix(d, cfg_scale, guided):
    if not guided:
        return d
    cond, uncond = d.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def euler_sampler(
    model: Model,
    latents: torch.Tensor,
    y: torch.Tensor,
    *,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int = 1000,
) -> torch.Tensor:
    """The reference's `euler_sampler` (heun=False): Euler on linspace(1, 0, num_steps + 1)."""
    y_null = torch.full_like(y, null_label)
    dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:], strict=True):
        x_cur = x_next
        guided = _guided(t_cur, cfg_scale, guidance_low, guidance_high)
        model_input, y_cur = _inputs(x_cur, y, y_null, guided)
        time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_cur
        d_cur = model(model_input.to(dtype), time_input.to(dtype), y_cur).to(torch.float64)
        x_next = x_cur + (t_next - t_cur) * _mix(d_cur, cfg_scale, guided)
    return x_next


def _linear_score(v, x, t):
    """The reference's `get_score_from_velocity` for the linear path."""
    t = t.view(t.size(0), *([1] * (x.dim() - 1)))
    alpha, d_alpha = 1 - t, -torch.ones_like(x)
    sigma, d_sigma = t, torch.ones_like(x)
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


Noise = Callable[[int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def euler_maruyama_sampler(
    model: Model,
    latents: torch.Tensor,
    y: torch.Tensor,
    *,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int = 1000,
    noise: Noise | None = None,
) -> torch.Tensor:
    """The reference's `euler_maruyama_sampler` (linear path): linspace(1, 0.04, num_steps),
    then 0, diffusion 2t, the last step deterministic. `noise(i, x_cur)` gives step i's
    Gaussian noise (default: `torch.randn_like`, the reference's)."""
    noise = noise or (lambda i, x: torch.randn_like(x))
    y_null = torch.full_like(y, null_label)
    dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def drift(x_cur, t_cur):
        guided = _guided(t_cur, cfg_scale, guidance_low, guidance_high)
        model_input, y_cur = _inputs(x_cur, y, y_null, guided)
        time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_cur
        v_cur = model(model_input.to(dtype), time_input.to(dtype), y_cur).to(torch.float64)
        s_cur = _linear_score(v_cur, model_input, time_input)
        return _mix(v_cur - 0.5 * (2 * t_cur) * s_cur, cfg_scale, guided)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-2], t_steps[1:-1], strict=True)):
        dt = t_next - t_cur
        x_cur = x_next
        deps = noise(i, x_cur).to(torch.float64) * torch.sqrt(torch.abs(dt))
        x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(2 * t_cur) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)
