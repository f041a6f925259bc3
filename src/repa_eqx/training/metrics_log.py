"""Training metrics: JSON lines (always), TensorBoard event files and a Weights & Biases run
(on request), PNG plots."""

import json
import math
import secrets
from pathlib import Path

from ..core.files import storage_errors, write_json, write_text


def _figure(rows: int, cols: int, figsize: tuple[float, float]):
    """A figure and its axes grid, without pyplot: no backend is chosen or changed (a
    notebook's plots are left alone) and matplotlib is imported only when a plot is drawn."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


class MetricsLog:
    """Where a run's numbers go: RUN/metrics.jsonl, and on request TensorBoard event files
    (RUN/tensorboard) and a Weights & Biases run (`wandb`: a `WandbSpec`; its id is kept in
    RUN/wandb.json so that a resumed run continues it)."""

    def __init__(
        self, run_dir: str | Path, tensorboard: bool = False, wandb=None, config: dict | None = None
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        with storage_errors(self.run_dir):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = _start_wandb(self.run_dir, wandb, config) if wandb is not None else None

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint we restart from."""
        if self.path.exists():
            keep = [r for r in read_metrics(self.path) if r["step"] <= step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **values}
        with storage_errors(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._wandb is not None:
            # Our step is a metric, not W&B's own: a resumed run may log a step again.
            self._wandb.log(record)

    def image(self, name: str, path: str | Path, step: int) -> None:
        """A PNG (a sample grid) at `step`, for the trackers that show images."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({"step": step, name: wandb.Image(str(path))})

    def card(self, name: str, card: dict) -> None:
        """How the run's numbers are made (an evaluation card), for the trackers."""
        if self._wandb is not None:
            self._wandb.config.update({name: card}, allow_val_change=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, spec, config: dict | None):
    """The W&B run of this training run: a new one, or the one RUN/wandb.json names."""
    import wandb

    record = run_dir / "wandb.json"
    run_id = json.loads(record.read_text())["id"] if record.is_file() else secrets.token_hex(4)
    run = wandb.init(
        project=spec.project,
        entity=spec.entity,
        name=spec.name or run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
    )
    run.define_metric("*", step_metric="step")
    write_json(record, {"id": run_id, "project": spec.project, "entity": spec.entity})
    return run


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Loss, denoising loss and REPA loss against step."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    panels = [k for k in ("loss", "denoise_loss", "repa_loss") if any(k in r for r in records)]
    fig, axes = _figure(1, len(panels), (4.2 * len(panels), 3.2))
    for ax, key in zip(axes[0], panels, strict=True):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "repa_loss":
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    return png_path


EVAL_TITLES = {
    "fd_mnist": "FD, MNIST-classifier features (lower is better)",
    "fd_dinov2": "FD-DINOv2 (lower is better)",
    "class_accuracy": "samples read as their class",
    "cknna": "CKNNA, SiT vs target encoder",
    "linear_probe": "linear probe top-1, SiT features",
}


def plot_eval(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """The in-training evaluation metrics against step, one panel each, beside the losses."""
    records = read_metrics(metrics_path)
    panels = [k for k in ("loss", "repa_loss", *EVAL_TITLES) if any(k in r for r in records)]
    if not any(k in EVAL_TITLES for k in panels):
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = _figure(rows, cols, (4.2 * cols, 3.2 * rows))
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, panels, strict=False):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        marker = "o" if key in EVAL_TITLES else None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, marker=marker, ms=4)
        ax.set_title(EVAL_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    return png_path
