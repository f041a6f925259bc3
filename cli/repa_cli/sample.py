"""`repa sample`: images from a trained model, as PNG files, a grid and an ADM `.npz`."""

from pathlib import Path
from typing import Annotated

import typer

from ._common import fail, user_errors


def _interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected LOW,HIGH such as 0,0.7; got {text!r}") from None
    return low, high


def _classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected class ids such as 1,207,360; got {text!r}") from None


def _key_values(items: list[str] | None) -> dict[str, str | int]:
    out: dict[str, str | int] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return out


def sample(
    ckpt: Annotated[
        Path | None,
        typer.Option(
            help="A run directory, one checkpoint RUN/checkpoints/STEP, an official REPA .pt "
            "file, a DiT one (DiT-XL-2-256x256.pt) or a LightningDiT one. Default: the most "
            "recent run under --runs-dir."
        ),
    ] = None,
    from_hub: Annotated[
        str | None,
        typer.Option(
            "--from-hub",
            help="A Hub repository: a model published with `repa push-to-hub`, or one holding "
            "an official REPA .pt file or a LightningDiT one "
            "(hustvl/lightningdit-xl-imagenet256-800ep)",
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision for --from-hub")] = None,
    official_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--official-arg",
            help="For official checkpoints without args: --official-arg model=SiT-XL/2 "
            "(also encoder_depth=8, projector_embed_dims=768, resolution, path_type); for DiT "
            "files the tensors and the file name do not describe: model=DiT-XL/2, "
            "image_size=256, num_heads",
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="ode or sde for a SiT, ddpm or ddim for a DiT (default: ode, or ddpm for a DiT)"
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Sampling steps (default: 50 for ode and ddim, 250 for sde and ddpm)"),
    ] = None,
    solver: Annotated[str, typer.Option(help="ODE solver: euler or heun")] = "euler",
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale (1: none)")] = 1.0,
    interval: Annotated[
        str,
        typer.Option(help="Guidance interval LOW,HIGH in t (1 = noise; a DiT's t = step / 1000)"),
    ] = "0,1",
    cfg_channels: Annotated[
        int | None,
        typer.Option(
            help="DiT or ODE: guide only the first N output channels (3 reproduces DiT's "
            "sample.py and LightningDiT's inference.py)"
        ),
    ] = None,
    cls_cfg: Annotated[
        float | None,
        typer.Option(
            help="REG models: guidance scale of the CLS token (default: --cfg; 0: unguided)"
        ),
    ] = None,
    shift: Annotated[
        float,
        typer.Option(
            help="ODE: LightningDiT's timestep shift of the grid (its timestep_shift, e.g. 0.3; "
            "1: equal steps). Its cfg_interval_start C is --interval 0,1-C"
        ),
    ] = 1.0,
    precision: Annotated[
        str,
        typer.Option(
            help="Network weights in fp32 or bf16 (bf16: faster where the hardware multiplies "
            "bf16 natively; the state is integrated in float32)"
        ),
    ] = "fp32",
    num: Annotated[int, typer.Option(help="Number of images")] = 64,
    classes: Annotated[
        str | None, typer.Option(help="Class ids to cycle through, e.g. 1,207,360")
    ] = None,
    class_balanced: Annotated[
        bool, typer.Option("--class-balanced", help="Every class in turn (equal counts: fair FID)")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same images, any batch size")] = 0,
    batch: Annotated[int, typer.Option(help="Images per batch, over all devices")] = 64,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: RUN/samples/SETTINGS); the .npz goes beside"),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(
            help="VAE that decodes latent-space models (default: the run's decoder, else "
            "stabilityai/sd-vae-ft-ema); it must decode the run's latent space"
        ),
    ] = None,
    png: Annotated[bool, typer.Option(help="Write one PNG per image")] = True,
    runs_dir: Annotated[Path, typer.Option(help="Where training runs live")] = Path("runs"),
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
) -> None:
    """Sample with the EMA weights (ODE or SDE; DDPM or DDIM for a DiT; guidance restricted
    to an interval)."""
    from repa_eqx.runs.sample import find_model, sample_model

    low_high = _interval(interval)
    wanted = _classes(classes)
    try:
        model = find_model(
            ckpt,
            from_hub=from_hub,
            revision=revision,
            official_args=_key_values(official_arg),
            runs_dir=runs_dir,
        )
        run = sample_model(
            model,
            mode=mode,
            steps=steps,
            solver=solver,
            cfg=cfg,
            interval=low_high,
            cfg_channels=cfg_channels,
            cls_cfg=cls_cfg,
            shift=shift,
            precision=precision,
            num=num,
            classes=wanted,
            class_balanced=class_balanced,
            seed=seed,
            batch=batch,
            out=out,
            vae=vae,
            png=png,
            from_hub=from_hub,
            progress=progress,
        )
    except user_errors() as e:
        fail(str(e))
    samples = run.samples
    step = f" step {model.step}" if model.step is not None else ""
    typer.echo(f"sampled {num} images from {model.source}{step} ({run.spec.name})")
    typer.echo(f"  {samples.folder / 'grid.png'}")
    typer.echo(
        f"  {samples.npz}  arr_0 {samples.images.shape} uint8, labels {samples.labels.shape}"
    )
