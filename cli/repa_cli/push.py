"""`repa push-to-hub`: a run's export (EMA weights, config, model card) to the Hub."""

import math
from pathlib import Path
from typing import Annotated

import typer

from ._common import fail, user_errors


def _size(n: int) -> str:
    """Bytes in decimal units, as the Hub shows them."""
    power = min(int(math.log10(max(n, 1)) // 3), 3)
    unit = ("B", "kB", "MB", "GB")[power]
    return f"{n} B" if power == 0 else f"{n / 1000**power:.1f} {unit}"


def push_to_hub(
    repo_id: Annotated[
        str | None,
        typer.Argument(help="Hub repository OWNER/NAME (default: the recipe's output.hub_repo)"),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            help="A run directory or one checkpoint RUN/checkpoints/STEP. Default: the most "
            "recent run under --runs-dir."
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Make a new repository private")
    ] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to commit to (created if new; default: main)")
    ] = None,
    message: Annotated[str | None, typer.Option(help="Commit message")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write the export and list it; upload nothing")
    ] = False,
    include_train_state: Annotated[
        bool,
        typer.Option(
            "--include-train-state",
            help="Also upload train_state.safetensors (weights, EMA, optimiser state, step)",
        ),
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Export folder (default: RUN/export)")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where training runs live")] = Path("runs"),
) -> None:
    """Upload a trained run's EMA SiT, config and model card to the Hugging Face Hub."""
    from repa_eqx.runs.load import latest_run
    from repa_eqx.runs.push import push_run

    try:
        result = push_run(
            run or latest_run(runs_dir),
            repo_id,
            out_dir=out,
            private=private,
            revision=revision,
            message=message,
            include_train_state=include_train_state,
            dry_run=dry_run,
        )
    except user_errors() as e:
        fail(str(e))
    target = f"{result.repo_id or 'OWNER/NAME'} ({result.revision})"
    verb = "would upload" if dry_run else "uploaded"
    typer.echo(f"{verb} {result.folder} to {target}:")
    for name, size in result.files:
        typer.echo(f"  {name}  {_size(size)}")
    if result.commit_url:
        typer.echo(f"  {result.commit_url}")
