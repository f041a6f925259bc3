"""The spaces a model denoises: each face (encode, normalise, decode) is the computation the
rest of the package used before it had one (pixels: x / 127.5 - 1, rounded back; SD-VAE:
posterior moments, z = (mean + std eps) * scale, decoded and truncated as REPA does)."""

import jax
import jax.numpy as jnp
import numpy as np

from repa_eqx.pretrained.vae import AutoencoderKL, VAEConfig
from repa_eqx.spaces import Pixels, SDVAELatents
from repa_eqx.spaces.sd_vae import encode_uint8, latents_to_uint8, to_latents


def test_pixels_round_trip_and_rounding():
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    space = Pixels()
    x = space.encode(images)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(space.normalise(x), x)
    np.testing.assert_array_equal(space.decode(x), images.transpose(0, 2, 3, 1))
    # Half a level up rounds to the next level; out-of-range values clip.
    nudged = space.decode(jnp.asarray(x) + 0.6 / 127.5)
    np.testing.assert_array_equal(
        nudged, np.minimum(images.astype(int) + 1, 255).transpose(0, 2, 3, 1)
    )
    assert space.decode(jnp.full((1, 1, 2, 2), 7.0)).max() == 255 and not space.latent


def _vae() -> AutoencoderKL:
    config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    return AutoencoderKL(config, key=jax.random.key(0))


def test_sd_vae_latents_are_the_reference_computation():
    vae = _vae()
    space = SDVAELatents(vae)
    images = np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    moments = space.encode(images)
    np.testing.assert_array_equal(moments, encode_uint8(vae, jnp.asarray(images)))
    assert moments.shape == (2, 8, 8, 8) and space.latent and space.factor == 0.18215
    key = jax.random.key(2)
    mean, std = jnp.split(moments, 2, axis=1)
    np.testing.assert_array_equal(
        space.normalise(moments, key=key), to_latents(mean, std, key=key, scale=0.18215)
    )
    np.testing.assert_array_equal(space.normalise(moments), mean * 0.18215)
    z = space.normalise(moments, key=key)
    np.testing.assert_array_equal(space.decode(z), latents_to_uint8(vae, z))
    # The training step builds the space from the dataset's scale alone.
    np.testing.assert_array_equal(
        SDVAELatents(scale=0.5).normalise(moments), mean * jnp.float32(0.5)
    )
