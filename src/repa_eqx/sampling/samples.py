"""Sampling many images from a trained SiT: per-example noise and labels, batches sharded
over devices, the ODE or SDE sampler (DDPM or DDIM for a DiT), decoding, and the files
evaluation tools read.

Everything random about example i (its noise, its SDE noise, its random label) comes from
`fold_in(key(seed), i)`, so the images of a seed do not depend on the batch size or on the
number of devices.
"""

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, Key
from PIL import Image

from ..core.batching import map_batches
from ..core.errors import ConfigError
from ..core.files import atomic_file, storage_errors
from ..core.images import save_grid
from ..diffusion.ddpm import Schedule, ddim_sample, ddpm_sample
from ..diffusion.interpolants import PathType
from ..diffusion.samplers import ode_sample, sde_sample
from ..model.sit import SiT, unstack_blocks
from ..nn.layers import lay_out_for_lowp
from ..spaces import Pixels, Space

CARD_KEY = "card"  # the .npz entry that says how the samples were made (JSON)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to sample: the reference's `generate.py` options. "ode" and "sde" sample a SiT
    (interpolant objective); "ddpm" (the chain respaced to `num_steps` evenly spread steps,
    DiT's default 250) and "ddim" (DDIM's "ddimN" striding, eta 0) sample a DiT. The guidance
    interval is in t = step / 1000 for the latter (`diffusion/ddpm.py`)."""

    mode: Literal["ode", "sde", "ddpm", "ddim"] = "ode"
    num_steps: int = 50
    solver: Literal["euler", "heun"] = "euler"  # ODE only
    cfg_scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    path: PathType = "linear"  # the interpolant the model was trained on (the SDE's score)
    # DiT and ODE: guide the first this many output channels (None: all). DiT's sample.py
    # guides 3 of the 4 latent channels, LightningDiT's inference.py 3 of its 32; 3 reproduces
    # their published guided samples.
    cfg_channels: int | None = None
    # REG: the guidance scale of the CLS token's drift (REG's --cls-cfg-scale; None: cfg_scale;
    # <= 0: the conditional drift, unguided).
    cls_cfg_scale: float | None = None
    # ODE only: LightningDiT's timestep shift of the grid (`diffusion.samplers.shift_times`;
    # its `timestep_shift`, 0.3 in its recipes; 1: equal steps).
    shift: float = 1.0

    def __post_init__(self):
        if self.num_steps < 1:
            raise ConfigError(f"the sampler needs at least one step, got {self.num_steps}")
        if self.cfg_channels is not None and self.mode not in ("ddpm", "ddim", "ode"):
            raise ConfigError("cfg_channels applies to the modes 'ode', 'ddpm' and 'ddim' only")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ConfigError(f"cfg_channels must be >= 1, got {self.cfg_channels}")
        if not self.shift > 0:
            raise ConfigError(f"shift must be > 0 (1: none), got {self.shift}")
        if self.shift != 1 and self.mode != "ode":
            raise ConfigError(f"shift applies to mode 'ode' only, not {self.mode!r}")
        if self.mode not in ("ode", "sde", "ddpm", "ddim"):
            raise ConfigError(
                f"mode must be 'ode' or 'sde' (SiT), or 'ddpm' or 'ddim' (DiT), got {self.mode!r}"
            )

    @property
    def ddpm(self) -> bool:
        """Whether this samples a DDPM-trained model (a DiT, with learned variance)."""
        return self.mode in ("ddpm", "ddim")

    def schedule(self) -> Schedule:
        """The respaced DDPM chain of the "ddpm" and "ddim" modes."""
        spacing = f"ddim{self.num_steps}" if self.mode == "ddim" else str(self.num_steps)
        return Schedule.linear().respace(spacing)

    @property
    def name(self) -> str:
        low, high = self.interval
        solver = f"-{self.solver}" if self.mode == "ode" else ""
        channels = f"-c{self.cfg_channels}" if self.cfg_channels is not None else ""
        if self.cls_cfg_scale is not None:
            channels += f"-clscfg{self.cls_cfg_scale:g}"
        shift = f"-shift{self.shift:g}" if self.shift != 1 else ""
        return (
            f"{self.mode}{solver}-{self.num_steps}-cfg{self.cfg_scale:g}{channels}-{low:g}_{high:g}"
            + shift
        )


def sample(
    sit: SiT,
    spec: SamplerSpec,
    noise: Float[Array, "batch c h w"],
    labels: Int[Array, " batch"],
    keys: Key[Array, " batch"],
) -> Float[Array, "batch c h w"]:
    """Samples of `sit` (in its own space: pixels in [-1, 1] or scaled latents). A REG SiT
    starts its CLS token from Gaussian noise drawn from the example's key (`keys`, as its SDE
    noise) and integrates it with the image (`diffusion.samplers`, guided by
    `spec.cls_cfg_scale`)."""
    if spec.ddpm != sit.config.learn_sigma:
        raise ConfigError(
            f"mode {spec.mode!r} does not sample this model: 'ddpm' and 'ddim' sample a DiT "
            "(DDPM objective, learned variance), 'ode' and 'sde' a SiT (interpolant objective)"
        )

    # The blocks run unrolled, each from its own weight arrays (`unstack_blocks`: split once
    # here, not copied out of the stack at every step), bf16 ones laid out for their products
    # once (`nn.layers.lay_out_for_lowp`; a no-op in float32). No hidden state is asked
    # (`depths=()`). The outputs join the state in its dtype: a float32 state integrates a
    # bf16 model's velocities in float32.
    if not isinstance(sit.blocks, tuple):
        sit = eqx.tree_at(lambda s: s.blocks, sit, unstack_blocks(sit.blocks))
    sit = lay_out_for_lowp(sit)

    def network(x, t, y):  # SiT: the velocity; DiT: the noise and the variance
        output = jax.vmap(lambda x, t, y: sit.forward(x, t, y, depths=()).output)(x, t, y)
        return output.astype(x.dtype)

    common = dict(cfg_scale=spec.cfg_scale, interval=spec.interval, null_label=sit.null_label)
    if sit.config.cls_dim:  # REG: the image and the CLS token, integrated jointly
        cls_noise = jax.vmap(
            lambda k: jax.random.normal(
                jax.random.fold_in(k, 0x7FFFFFFF), (sit.config.cls_dim,), noise.dtype
            )
        )(keys)
        noise = (noise, cls_noise)
        cls_cfg = spec.cfg_scale if spec.cls_cfg_scale is None else spec.cls_cfg_scale
        common["cfg_scale"] = (spec.cfg_scale, cls_cfg)

        def network(state, t, y):
            def one(x, cls, t, y):
                out = sit.forward(x, t, y, cls=cls, depths=())
                return out.output.astype(x.dtype), out.cls.astype(cls.dtype)

            return jax.vmap(one)(*state, t, y)

    if spec.ddpm:
        run = ddpm_sample if spec.mode == "ddpm" else ddim_sample
        return run(
            network,
            noise,
            labels,
            keys,
            schedule=spec.schedule(),
            cfg_channels=spec.cfg_channels,
            **common,
        )
    common["num_steps"] = spec.num_steps
    if spec.mode == "ode":
        if spec.cfg_channels is not None and sit.config.cls_dim:
            raise ConfigError("cfg_channels does not apply to REG models (a CLS token)")
        out = ode_sample(
            network,
            noise,
            labels,
            solver=spec.solver,
            shift=spec.shift,
            guided_channels=spec.cfg_channels,
            **common,
        )
    else:
        out = sde_sample(network, noise, labels, keys, path=spec.path, **common)
    return out[0] if sit.config.cls_dim else out  # REG: the image; its CLS token is dropped


sample_jit = eqx.filter_jit(sample)


def example_inputs(
    seed: int, indices: Int[Array, " n"], shape: tuple[int, ...]
) -> tuple[Float[Array, "n ..."], Key[Array, " n"]]:
    """Example i's initial noise and its SDE key, from `fold_in(key(seed), i)` alone (its
    random label, if any, is drawn from the same key: `choose_labels`)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
    return noise, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


def choose_labels(
    num: int,
    num_classes: int,
    *,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    balanced: bool = False,
) -> np.ndarray:
    """The label of every example: the given `classes` in turn, every class in turn
    (`balanced`: equal counts per class when `num` is a multiple of `num_classes`), or uniform
    at random per example (the reference's default)."""
    if classes is not None and balanced:
        raise ConfigError("give either classes or balanced, not both")
    if classes is not None:
        classes = np.asarray(classes, np.int32)
        if classes.size == 0 or classes.min() < 0 or classes.max() >= num_classes:
            raise ConfigError(f"classes must lie in [0, {num_classes}), got {classes.tolist()}")
        return classes[np.arange(num) % len(classes)]
    if balanced:
        return (np.arange(num) % num_classes).astype(np.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(num))
    draw = lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, num_classes)
    return np.asarray(jax.vmap(draw)(keys))


def save_samples(
    path: str | Path, images: np.ndarray, labels: np.ndarray | None = None, *, card=None
) -> Path:
    """A sample batch as ADM's evaluator reads it, written atomically: `arr_0` uint8 NHWC
    images with 3 channels, `labels` if given, and `card` (a JSON string: how the samples
    were made) if given."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(
            f"{path}: arr_0 must be uint8 NHWC images with 3 channels, "
            f"got {images.dtype} {images.shape}"
        )
    extra = {} if labels is None else {"labels": np.asarray(labels)}
    if card is not None:
        extra[CARD_KEY] = np.array(json.dumps(card))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, **extra)
    return Path(path)


def _rgb(images: np.ndarray) -> np.ndarray:
    """Grey images repeated to 3 channels: the layout ADM's evaluator reads."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


@dataclasses.dataclass
class Samples:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int (N,)
    npz: Path | None
    folder: Path | None


def generate(
    sit: SiT,
    spec: SamplerSpec,
    *,
    num: int,
    labels: np.ndarray,
    seed: int = 0,
    batch_size: int = 64,
    space: Space | None = None,
    out: str | Path | None = None,
    png: bool = True,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
    console=None,
    card: dict | None = None,
) -> Samples:
    """`num` samples of `sit` with the given labels, decoded by `space` (default: pixels) to
    uint8 NHWC with 3 channels (grey repeated).

    With `out`, writes `out/000000.png`..., `out/grid.png` and `out.npz` (ADM layout:
    `arr_0` uint8 NHWC, plus `labels`, plus `card`, a JSON string of how the samples were
    made, when given). The batch is split over `devices` (default: all local devices),
    rounded up to a multiple of their number.
    """
    if num < 1 or batch_size < 1:
        raise ConfigError(
            f"need at least one sample and a batch of one: num {num}, batch {batch_size}"
        )
    if len(labels) != num:
        raise ConfigError(f"{len(labels)} labels for {num} samples")
    space = space or Pixels()
    devices = list(devices or jax.local_devices())
    batch_size = math.ceil(batch_size / len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    data = NamedSharding(mesh, P("data"))
    # Split the block stack once for every batch (sample() would split it at every call).
    sit = eqx.tree_at(lambda s: s.blocks, sit, unstack_blocks(sit.blocks))
    sit = eqx.filter_shard(sit, NamedSharding(mesh, P()))
    cfg = sit.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)

    def batch(indices: np.ndarray, y: np.ndarray) -> np.ndarray:
        noise, keys = example_inputs(seed, jnp.asarray(indices), shape)
        noise, keys, y = jax.device_put((noise, keys, jnp.asarray(y)), data)
        return _rgb(space.decode(sample_jit(sit, spec, noise, y, keys)))

    images = map_batches(
        batch,
        np.arange(num),
        np.asarray(labels),
        batch_size=batch_size,
        label="sample",
        progress=progress,
        console=console,
    )
    npz = folder = None
    if out is not None:
        folder = Path(out)
        with storage_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
            if png:
                for i, image in enumerate(images):
                    Image.fromarray(image).save(folder / f"{i:06d}.png")
        n_grid = min(num, 64)
        nrow = 8 if n_grid >= 8 else n_grid
        scale = max(1, 64 // images.shape[1])  # small images: enlarged, pixels kept sharp
        grid = images[:n_grid].transpose(0, 3, 1, 2)
        save_grid(grid, folder / "grid.png", nrow=nrow, scale=scale)
        npz = folder.with_name(folder.name + ".npz")
        save_samples(npz, images, labels, card=card)
    return Samples(images, np.asarray(labels), npz, folder)
