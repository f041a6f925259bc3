"""Pushing a run to the Hugging Face Hub: its export (see `export.py`) in one commit.

The token is huggingface_hub's to find (HF_TOKEN, or the `hf auth login` cache); it only ever
travels in the Authorization header. When the push fails, the export stays on disk.
"""

import dataclasses
import json
from pathlib import Path

from ..core.errors import RepaError
from ..training.recipe import load_recipe
from .export import CONFIG, export_files, export_run


class PushError(RepaError, ValueError):
    """The push cannot be made; the message says why and where the export is."""


@dataclasses.dataclass
class PushResult:
    repo_id: str | None  # None for a dry run that named no repository
    revision: str
    folder: Path  # the export that was (or would be) uploaded
    files: list[tuple[str, int]]  # (name, bytes)
    commit_url: str | None  # None for a dry run


def _run_root(path: Path) -> Path:
    """The run directory of `RUN` or of one of its checkpoints `RUN/checkpoints/STEP`."""
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent
    return path


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1  # the card's `--from-hub` line needs the owner
    except HFValidationError:
        valid = False
    if not valid:
        raise PushError(f"{repo_id!r} is not a Hub repository id: expected OWNER/NAME")


def _hub_error(e: Exception, repo_id: str, endpoint: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push"
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status == 401:
            return "the Hub rejected the token (401): log in again with `hf auth login`"
        if status == 403:
            return f"the token may not write to {repo_id} (403): use a token with write access"
        return f"the Hub refused the push: {str(e).splitlines()[0]}"
    return f"cannot reach the Hub at {endpoint} ({type(e).__name__})"


def push_run(
    run_dir: str | Path,
    repo_id: str | None = None,
    *,
    step: int | None = None,
    out_dir: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    include_train_state: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Export a run (or `RUN/checkpoints/STEP`) and upload the export to `repo_id` [default:
    the recipe's `output.hub_repo`] as one commit on `revision` (created if new). `dry_run`
    only writes the export. `endpoint` defaults to huggingface_hub's (HF_ENDPOINT)."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    root = _run_root(Path(run_dir))
    has_recipe = (root / "recipe.toml").is_file()
    if repo_id is None and has_recipe:
        repo_id = getattr(load_recipe(root / "recipe.toml").output, "hub_repo", None)
    if repo_id is not None:
        _check_repo_id(repo_id)
    elif has_recipe and not dry_run:
        raise PushError(
            "no Hub repository to push to: name one (repa push-to-hub OWNER/NAME) or set "
            "output.hub_repo in the run's recipe"
        )
    branch = revision or constants.DEFAULT_REVISION
    folder = export_run(
        run_dir,
        out_dir,
        step=step,
        include_train_state=include_train_state,
        repo_id=repo_id,
        revision=revision,
    )
    files = export_files(folder)
    result = PushResult(repo_id, branch, folder, files, commit_url=None)
    if dry_run:
        return result
    if get_token() is None:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` "
            f"(the export is in {folder})"
        )
    exported_step = json.loads((folder / CONFIG).read_text())["step"]
    api = HfApi(endpoint=endpoint)
    try:
        # private=None leaves a new repository to the owner's default visibility.
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        # create_commit, not upload_folder: with hf_xet installed upload_folder may split a
        # folder over several commits, and only the export's own files belong in this one.
        commit = api.create_commit(
            repo_id,
            operations=[
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name)
                for name, _ in files
            ],
            commit_message=message or f"Upload {root.name} at step {exported_step} (repa-eqx)",
            revision=branch,
        )
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx2.RequestError) as e:
        reason = _hub_error(e, repo_id, api.endpoint)
        raise PushError(f"{reason} (the export is in {folder})") from None
    result.commit_url = commit.commit_url
    return result
