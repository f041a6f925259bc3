"""What every command shares: the one-line error for the errors that are the user's to fix."""

import typer


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def user_errors() -> type[BaseException]:
    """The base class of every expected error (imported lazily: the CLI answers `--help`
    without importing JAX). Any other exception is a bug and keeps its traceback."""
    from repa_eqx.core.errors import RepaError

    return RepaError
