import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_eqx.nn.resize import resize_bicubic, resize_matrix


def _torch_resize(x: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    out = F.interpolate(
        torch.from_numpy(x), size=size, mode="bicubic", align_corners=False, antialias=antialias
    )
    return out.numpy()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((37, 37), (16, 16)),  # DINOv2 position table -> REPA grid
        ((37, 37), (8, 8)),
        ((16, 16), (37, 37)),
        ((4, 4), (6, 6)),
        ((256, 256), (224, 224)),  # image -> DINOv2 input
        ((128, 96), (224, 224)),
        ((384, 512), (224, 112)),
        ((9, 7), (5, 11)),
        ((1, 5), (3, 2)),
        ((7, 7), (7, 7)),
    ],
)
def test_matches_torch(src, dst, antialias):
    x = np.random.default_rng(0).standard_normal((2, 3, *src)).astype(np.float32)
    ours = np.asarray(
        jax.jit(resize_bicubic, static_argnums=1, static_argnames="antialias")(
            x, dst, antialias=antialias
        )
    )
    assert ours.shape == (2, 3, *dst)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _torch_resize(x, dst, antialias), rtol=0, atol=1e-5)


@pytest.mark.parametrize("antialias", [False, True])
def test_rows_sum_to_one(antialias):
    # A constant image stays constant, in either direction.
    for n_in, n_out in [(37, 16), (16, 37), (5, 5)]:
        matrix = resize_matrix(n_in, n_out, antialias=antialias)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)


def test_leading_axes_and_uint8():
    x = np.random.default_rng(1).integers(0, 256, (4, 20, 30), dtype=np.uint8)
    ours = np.asarray(resize_bicubic(x, (10, 45), antialias=False))
    ref = _torch_resize(x[None].astype(np.float32), (10, 45), antialias=False)[0]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)  # values up to 255
