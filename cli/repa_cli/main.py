"""The `repa` command line: parses arguments, calls the library, turns errors into one line."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from ._common import fail, user_errors
from .convert import convert
from .evaluate import evaluate, fid, reference
from .preprocess import preprocess
from .push import push_to_hub
from .sample import sample

app = typer.Typer(
    help="REPA (representation alignment) for diffusion transformers, in JAX/Equinox.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Train SiT with REPA (`repa train`), sample from it (`repa sample`), publish it
    (`repa push-to-hub`); convert pretrained weights (`repa convert`)."""
    # Before any command starts a backend: XLA reads its flags once (core.xla_flags). Help
    # needs no backend and is answered without importing the library.
    if "--help" not in sys.argv[1:]:
        from repa_eqx.core.xla_flags import configure_xla_gpu

        configure_xla_gpu()


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/quickstart.toml")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key: --set optim.lr=3e-4 (TOML value)"),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in output.dir")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
    distributed: Annotated[
        bool,
        typer.Option(
            help="Several hosts: call jax.distributed.initialize first (run the same command "
            "on every host; the cluster comes from SLURM, Open MPI, a TPU pod or the options "
            "below)"
        ),
    ] = False,
    coordinator: Annotated[
        str | None, typer.Option(help="With --distributed: HOST:PORT of process 0")
    ] = None,
    num_processes: Annotated[int | None, typer.Option(help="With --distributed")] = None,
    process_id: Annotated[int | None, typer.Option(help="With --distributed")] = None,
) -> None:
    """Train a SiT (+ REPA) as the recipe says, on every device the recipe's mesh names;
    outputs go to the recipe's output.dir."""
    from repa_eqx.training import load_recipe
    from repa_eqx.training import train as run_training

    if distributed:  # before anything touches a device
        from repa_eqx.training.parallel import initialize_distributed

        try:
            initialize_distributed(coordinator, num_processes, process_id)
        except (RuntimeError, ValueError) as e:
            fail(f"--distributed: {e}")
    errors = user_errors()
    try:
        r = load_recipe(recipe, set_ or [])
        result = run_training(r, resume=resume, progress=progress)
    except KeyboardInterrupt as e:  # the loop says what it kept
        fail(getattr(e, "message", "interrupted before training started"), code=130)
    except errors as e:
        fail(str(e))
    out = result.run_dir
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.last.items() if "loss" in k)
    typer.echo(f"done: step {result.step}; {summary}")
    for name in ("samples.png", "loss.png", "metrics.jsonl", "recipe.toml"):
        if (out / name).exists():
            typer.echo(f"  {out / name}")


app.command()(sample)
app.command()(convert)
app.command("push-to-hub")(push_to_hub)
app.command()(fid)
app.command("eval")(evaluate)
app.command()(reference)
app.command()(preprocess)

if __name__ == "__main__":
    app()
