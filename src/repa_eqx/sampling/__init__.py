"""Sampling a trained model: `generate` draws N images with per-example noise, labels and
sampler (ODE / SDE for a SiT, DDPM / DDIM for a DiT), batched and sharded over devices,
decoded by the model's space, written as PNGs, a grid and an ADM `.npz`."""

from .samples import SamplerSpec as SamplerSpec
from .samples import generate as generate
