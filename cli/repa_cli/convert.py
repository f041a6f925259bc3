"""`repa convert`: pretrained weights into a cached JAX pytree that loads without torch."""

from typing import Annotated

import typer

from ._common import fail, user_errors
from .sample import _key_values


def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="Hub id (facebook/dinov2-base, stabilityai/sd-vae-ft-ema, "
            "hustvl/vavae-imagenet256-f16d32-dinov2, REPA-E/e2e-vavae, "
            "hustvl/lightningdit-xl-imagenet256-800ep, ...), a local folder in the Hub layout, "
            "an official REPA or LightningDiT checkpoint file (.pt) or an LDM VAE .pt"
        ),
    ],
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit")] = None,
    official_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--official-arg",
            help="For official checkpoints without args: --official-arg model=SiT-XL/2",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if cached")] = False,
) -> None:
    """Convert once; print the folder holding model.safetensors and config.json."""
    import json

    from repa_eqx.pretrained import convert as run_convert

    try:
        folder = run_convert(
            source, revision=revision, official_args=_key_values(official_arg), force=force
        )
    except user_errors() as e:
        fail(str(e))
    header = json.loads((folder / "config.json").read_text())
    size = (folder / "model.safetensors").stat().st_size / 2**20
    typer.echo(f"{header['family']} from {header['source']} @ {header['revision']}")
    typer.echo(f"  {folder}  ({size:.1f} MiB)")
