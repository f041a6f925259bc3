"""`repa preprocess`: ImageNet-style images -> ADM centre crops + SD-VAE moments, sharded."""

from pathlib import Path
from typing import Annotated

import typer

from ._common import fail, user_errors


def preprocess(
    source: Annotated[
        Path,
        typer.Argument(
            help="Image folder with one sub-folder per class (ImageNet's train/), or the root "
            "of the paths in --list-file"
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output folder (rerun the command to resume)")],
    vae: Annotated[
        str, typer.Option(help="SD-VAE: a Hub id or a local folder in the diffusers layout")
    ] = "stabilityai/sd-vae-ft-mse",
    vae_revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit")] = None,
    resolution: Annotated[int, typer.Option(help="Image side: 256 or 512 (ADM crop)")] = 256,
    list_file: Annotated[
        Path | None,
        typer.Option(help="Text file of 'relative/path label_index' lines, relative to SOURCE"),
    ] = None,
    batch: Annotated[int, typer.Option(help="Images per VAE batch, over all devices")] = 64,
    shard_size: Annotated[int, typer.Option(help="Input images per shard")] = 4096,
    num_workers: Annotated[
        int | None, typer.Option(help="Workers sharing the job (default: JAX processes)")
    ] = None,
    worker_index: Annotated[
        int | None,
        typer.Option(help="This worker, 0..W-1: it takes the shards k with k % W == I"),
    ] = None,
    workers_threads: Annotated[
        int | None, typer.Option(help="Image-decoding threads (default: CPU cores, at most 32)")
    ] = None,
    finalize: Annotated[
        bool,
        typer.Option(
            "--finalize", help="Only write manifest.json, once every worker's shards are done"
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
) -> None:
    """Centre-crop (ADM) every image, encode it with the SD-VAE, and write sharded uint8
    images, posterior mean and std, labels and a checksummed OUT/manifest.json.

    Rerun the same command to resume. Share the work: --num-workers W --worker-index I."""
    from repa_eqx.data.writer import finalize as write_manifest
    from repa_eqx.data.writer import preprocess as run_preprocess

    try:
        if finalize:
            manifest = write_manifest(out)
        else:
            result = run_preprocess(
                source,
                out,
                vae=vae,
                vae_revision=vae_revision,
                resolution=resolution,
                list_file=list_file,
                batch_size=batch,
                shard_size=shard_size,
                num_workers=num_workers,
                worker_index=worker_index,
                threads=workers_threads,
                progress=progress,
            )
            manifest = result.manifest
    except user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: finished shards are kept; rerun the same command to resume", code=130)
    if manifest is None:
        typer.echo(
            f"wrote {result.shards_written} shards ({result.examples_written} images); "
            f"{result.shards_complete} of {result.num_shards} shards done: the last worker to "
            "finish writes manifest.json (or run with --finalize)"
        )
        skipped = result.skipped
    else:
        typer.echo(
            f"done: {manifest['num_examples']} images of {manifest['num_classes']} classes in "
            f"{len(manifest['shards'])} shards -> {out / 'manifest.json'}"
        )
        stats = manifest["latent_stats"]
        if stats:
            shown = lambda values: ", ".join(f"{v:.4g}" for v in values)
            typer.echo(
                f"latent statistics per channel: mean [{shown(stats['mean'])}], "
                f"std [{shown(stats['std'])}]"
            )
        skipped = manifest["skipped"]
    if skipped:
        names = ", ".join(f"{s['path']} ({s['error']})" for s in skipped[:10])
        more = f", ... ({len(skipped) - 10} more in manifest.json)" if len(skipped) > 10 else ""
        typer.echo(f"skipped {len(skipped)} unreadable file(s): {names}{more}")
