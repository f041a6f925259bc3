"""What every command shares: the one-line error and the errors that are the user's to fix."""

import typer


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that carry a readable message for the user (imported lazily: the CLI
    answers `--help` without importing JAX)."""
    from repa_eqx import WeightsMismatch
    from repa_eqx.checkpoint import CheckpointMismatch, CheckpointUnreadable
    from repa_eqx.data import DataError
    from repa_eqx.hub import PretrainedNotFound
    from repa_eqx.parallel import MeshError
    from repa_eqx.preprocess import PreprocessError
    from repa_eqx.recipe import RecipeError
    from repa_eqx.train import TrainingDiverged

    return (
        RecipeError,
        DataError,
        CheckpointMismatch,
        CheckpointUnreadable,
        MeshError,
        TrainingDiverged,
        PretrainedNotFound,
        PreprocessError,
        WeightsMismatch,
        FileNotFoundError,
    )
