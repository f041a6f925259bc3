"""The diffusion math: interpolants and the velocity loss (SiT), DDPM with a learned variance
(DiT), and the ODE / SDE / DDPM / DDIM samplers with guidance on an interval. Pure functions
over arrays and callables; no model, no file."""
