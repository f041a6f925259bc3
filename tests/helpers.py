"""Helpers shared by the tests (plain functions; the shared fixtures are in conftest.py)."""

import contextlib

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from PIL import Image

from repa_eqx.training.recipe import parse_recipe, sit_config
from repa_eqx.training.step import init_state, make_optimizer


@contextlib.contextmanager
def unchecked():
    """The jaxtyping / beartype checker off: for input the annotations forbid, to see the
    library's own error (what a user without the checker gets)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def tiny_recipe(out, encoder=None, **sections):
    """A recipe for a 2-block SiT on MNIST-5k that trains in seconds; `sections` update it
    (e.g. `train={"steps": 4}`)."""
    table = {
        "model": dict(
            arch="SiT-S/4",
            depth=2,
            hidden_size=32,
            num_heads=2,
            encoder_depth=1,
            input_size=32,
            in_channels=1,
            num_classes=10,
            projector_dim=64,
        ),
        "encoders": [{"id": encoder, "resolution": 112}] if encoder else [],
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "data": {"dataset": "mnist-5k", "batch_size": 8, "precompute_features": False},
        "train": dict(
            steps=20,
            log_every=5,
            checkpoint_every=10,
            sample_every=1000,
            sample_steps=4,
            num_samples=10,
        ),
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        table[name] = table.get(name, {}) | values
    return parse_recipe(table)


def eval_recipe(out, encoder, **eval_spec):
    """`tiny_recipe` with the in-training evaluation every 2 of 4 steps, scored against the
    tiny DINOv2 `encoder` at 56 px (FD-DINOv2, CKNNA, probe); `eval_spec` updates it."""
    spec = dict(
        every=2,
        metrics=["fd_dinov2", "cknna", "linear_probe"],
        num_samples=20,
        sample_steps=2,
        num_real=100,
        fd_dinov2_id=encoder,
        fd_dinov2_resolution=56,
    )
    return tiny_recipe(out, encoder=encoder, train={"steps": 4}, eval=spec | eval_spec)


def state_like(recipe, z_dims):
    """A freshly initialised training state of `recipe`'s shapes: what a checkpoint fills."""
    return init_state(
        sit_config(recipe, 10),
        z_dims,
        recipe.model.projector_dim,
        make_optimizer(recipe),
        recipe.train.seed,
    )


def velocities(sit):
    """The SiT's velocity on three fixed inputs (the last with the null class of guidance)."""
    sit = jax.tree.map(jnp.asarray, sit)  # loaded leaves are numpy arrays
    x = jax.random.normal(jax.random.key(1), (3, 1, 32, 32))
    t = jnp.array([0.9, 0.5, 0.1])
    y = jnp.array([0, 3, 10])  # 10: the null class of guidance
    return np.asarray(jax.vmap(lambda x, t, y: sit(x, t, y)[0])(x, t, y))


# A small synthetic ImageNet-style folder for `repa preprocess` (conftest: `source`).
RES = 32  # any multiple of 8; the CLI documents 256 and 512
SETTINGS = dict(resolution=RES, batch_size=4, shard_size=8, threads=2, progress=False)
CLASSES = ["n01440764", "n01443537", "n01484850"]
# (class, file name, (width, height), PIL mode): odd sizes, every mode ImageNet-like folders hold.
GOOD = [
    (0, "a_37x53.jpg", (37, 53), "RGB"),
    (0, "b_300x200.JPEG", (300, 200), "RGB"),
    (0, "c_gray.png", (64, 40), "L"),
    (0, "d_rgba.png", (45, 45), "RGBA"),
    (0, "e_palette.png", (80, 33), "P"),
    (0, "f.bmp", (32, 32), "RGB"),
    (0, "g.webp", (50, 70), "RGB"),
    (1, "a_wide.jpeg", (129, 40), "RGB"),
    (1, "b_tall.png", (33, 100), "RGB"),
    (1, "c_cmyk.jpg", (90, 66), "CMYK"),
    (1, "d_big.png", (257, 130), "RGB"),
    (1, "sub/e_nested.jpg", (41, 39), "RGB"),
    (1, "f_gray.jpg", (48, 52), "L"),
    (2, "a.png", (32, 33), "RGB"),
    (2, "b.jpg", (200, 300), "RGB"),
    (2, "c.png", (70, 31), "LA"),
    (2, "d.jpg", (63, 64), "RGB"),
    (2, "e.PNG", (99, 98), "RGB"),
    (2, "f.jpg", (35, 36), "RGB"),
    (2, "g.jpg", (128, 64), "RGB"),
]
BAD = {"n01443537/bad.jpg": "cannot identify image file", "n01484850/cut.png": "truncated"}
TINY_VAE = {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}


def picture(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    """Smooth colours plus noise, so that every crop differs."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "P":
        return image.quantize(16)
    if mode in ("RGBA", "LA"):
        image = image.convert(mode[:-1])
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    return image.convert(mode)
