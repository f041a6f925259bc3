"""InceptionV3 as the FID literature uses it: the 2015-12-05 TensorFlow graph (the ADM
evaluator's `classify_image_graph_def.pb`), ported from pytorch-fid's converted weights
`pt_inception-2015-12-05-6726825d.pth`.

It differs from torchvision's InceptionV3 where the TF graph does: its average pools do not
count the zero padding, the last block max-pools its pool branch, and the classifier has
1008 outputs. Every batch norm (eps 0.001) is folded into its conv when loading.

One image gives three outputs, the ones ADM's evaluator reads from the graph:
- `pool` (2048): `pool_3`, the FID features.
- `spatial` (2023): `mixed_6/conv` for sFID, its first 7 channels flattened in (H, W, C)
  order, as ADM's `spatial[..., :7]` then `reshape` on TF's NHWC tensor (we are channels
  last too). `mixed_6` is the graph's seventh mixed block, torchvision's `Mixed_6d` (the
  graph counts `mixed`, `mixed_1`, ..., so `mixed_3` is the 35 -> 17 reduction
  `Mixed_6a`), and its `conv` is the block's 1x1 branch after batch norm and ReLU,
  `Mixed_6d.branch1x1`, whose 192 channels lead the block's output.
- `logits` (1008): `pool @ W` with the classifier's weight but *not* its bias, the
  logits of ADM's Inception Score (it rebuilds them from `softmax/logits/MatMul`'s weight
  input). The softmax is taken over all 1008 classes.
"""

import hashlib
import operator
import urllib.request
from pathlib import Path
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped

from ..core.batching import map_batches
from ..core.errors import ConfigError, RepaError
from ..core.files import atomic_file
from ..core.paths import cache_dir
from ..nn.resize import sample_positions
from ._convert import Target, fill
from ._torch_pickle import read_state_dict

FILENAME = "pt_inception-2015-12-05-6726825d.pth"
URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FILENAME}"
# torch.hub's convention: the name ends with the first hex digits of the file's SHA-256.
SHA256_PREFIX = "6726825d"

SIZE = 299
BN_EPS = 1e-3
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7

Resize = Literal["pytorch-fid", "tensorflow"]


class InceptionWeightsNotFound(RepaError, FileNotFoundError):
    """The FID Inception weights are neither cached nor downloadable."""


class InceptionOutput(NamedTuple):
    """What ADM's evaluator reads from the graph, for one image or (leading axis) many."""

    pool: Float[Array | np.ndarray, "*batch 2048"]
    spatial: Float[Array | np.ndarray, "*batch 2023"]
    logits: Float[Array | np.ndarray, "*batch 1008"]


# ------------------------------------------------------------------------------ layers


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class ConvBN(eqx.Module):
    """Conv, batch norm (folded into the conv's weight and bias), ReLU, channels last."""

    weight: Float[Array, "out in kh kw"]  # torch's layout
    bias: Float[Array, " out"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ):
        self.weight = jnp.zeros((out_channels, in_channels, *_pair(kernel)))
        self.bias = jnp.zeros(out_channels)
        self.stride = stride
        self.padding = _pair(padding)

    def __call__(self, x: Float[Array, "H W in"]) -> Float[Array, "h w out"]:
        ph, pw = self.padding
        if self.weight.shape[2:] == (1, 1) and self.stride == 1 and self.padding == (0, 0):
            # A 1x1 conv is a matmul over the channels: XLA:CPU runs it about twice as fast
            # as a matmul as it does as a conv (40 of the 94 convs here), and it is the same sum.
            y = jnp.einsum(
                "hwi,oi->hwo", x, self.weight[:, :, 0, 0], precision=jax.lax.Precision.HIGHEST
            )
            return jax.nn.relu(y + self.bias[None, None, :])
        y = jax.lax.conv_general_dilated(
            x[None],
            self.weight,
            window_strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            # Channels-last activations: the TF graph's layout, and XLA's fastest on CPU.
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            # Full float32 everywhere: TF32 convs on a GPU would move the metrics.
            precision=jax.lax.Precision.HIGHEST,
        )[0]
        return jax.nn.relu(y + self.bias[None, None, :])


def _max_pool(x: Float[Array, "H W c"], stride: int, padding: int = 0) -> Float[Array, "h w c"]:
    """3x3 max pool; padding never wins."""
    pad = ((padding, padding), (padding, padding), (0, 0))
    init = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, (3, 3, 1), (stride, stride, 1), pad)


def _avg_pool(x: Float[Array, "H W c"]) -> Float[Array, "H W c"]:
    """3x3, stride 1, padding 1 average pool that, as TF's, does not count the padding."""
    pad = ((1, 1), (1, 1))
    zero = jnp.array(0, x.dtype)
    total = jax.lax.reduce_window(x, zero, jax.lax.add, (3, 3, 1), (1, 1, 1), (*pad, (0, 0)))
    ones = jnp.ones(x.shape[:2], x.dtype)
    count = jax.lax.reduce_window(ones, zero, jax.lax.add, (3, 3), (1, 1), pad)
    return total / count[:, :, None]


class InceptionA(eqx.Module):
    """35x35 block (`Mixed_5b`-`5d`)."""

    branch1x1: ConvBN
    branch5x5_1: ConvBN
    branch5x5_2: ConvBN
    branch3x3dbl_1: ConvBN
    branch3x3dbl_2: ConvBN
    branch3x3dbl_3: ConvBN
    branch_pool: ConvBN

    def __init__(self, in_channels: int, pool_features: int):
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def __call__(self, x: Float[Array, "35 35 c"]) -> Float[Array, "35 35 d"]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_avg_pool(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(eqx.Module):
    """35 -> 17 reduction (`Mixed_6a`)."""

    branch3x3: ConvBN
    branch3x3dbl_1: ConvBN
    branch3x3dbl_2: ConvBN
    branch3x3dbl_3: ConvBN

    def __init__(self, in_channels: int):
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def __call__(self, x: Float[Array, "35 35 c"]) -> Float[Array, "17 17 768"]:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, stride=2)], axis=-1)


class InceptionC(eqx.Module):
    """17x17 block with factorised 7x7 convs (`Mixed_6b`-`6e`)."""

    branch1x1: ConvBN
    branch7x7_1: ConvBN
    branch7x7_2: ConvBN
    branch7x7_3: ConvBN
    branch7x7dbl_1: ConvBN
    branch7x7dbl_2: ConvBN
    branch7x7dbl_3: ConvBN
    branch7x7dbl_4: ConvBN
    branch7x7dbl_5: ConvBN
    branch_pool: ConvBN

    def __init__(self, in_channels: int, channels_7x7: int):
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def __call__(self, x: Float[Array, "17 17 768"]) -> Float[Array, "17 17 768"]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(d)))
        pool = self.branch_pool(_avg_pool(x))
        # The 1x1 branch leads: channels [0, 192) are the graph's `mixed_N/conv`.
        return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(eqx.Module):
    """17 -> 8 reduction (`Mixed_7a`)."""

    branch3x3_1: ConvBN
    branch3x3_2: ConvBN
    branch7x7x3_1: ConvBN
    branch7x7x3_2: ConvBN
    branch7x7x3_3: ConvBN
    branch7x7x3_4: ConvBN

    def __init__(self, in_channels: int):
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def __call__(self, x: Float[Array, "17 17 768"]) -> Float[Array, "8 8 1280"]:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, stride=2)], axis=-1)


class InceptionE(eqx.Module):
    """8x8 block with split 3x3 convs (`Mixed_7b`, `7c`)."""

    branch1x1: ConvBN
    branch3x3_1: ConvBN
    branch3x3_2a: ConvBN
    branch3x3_2b: ConvBN
    branch3x3dbl_1: ConvBN
    branch3x3dbl_2: ConvBN
    branch3x3dbl_3a: ConvBN
    branch3x3dbl_3b: ConvBN
    branch_pool: ConvBN
    # The graph's last block max-pools (pytorch-fid: "likely an error" in the TF model).
    pool: Literal["avg", "max"] = eqx.field(static=True)

    def __init__(self, in_channels: int, pool: Literal["avg", "max"]):
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)
        self.pool = pool

    def __call__(self, x: Float[Array, "8 8 c"]) -> Float[Array, "8 8 2048"]:
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else _max_pool(x, stride=1, padding=1)
        return jnp.concatenate(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            axis=-1,
        )


class InceptionV3(eqx.Module):
    """The FID InceptionV3 for one preprocessed 299x299x3 image (see `preprocess`); vmap it.

    Field names are pytorch-fid's state-dict prefixes with a lower-case first letter. It
    is built with zero weights (it is only ever used pretrained: see `load_inception`).
    """

    conv2d_1a_3x3: ConvBN
    conv2d_2a_3x3: ConvBN
    conv2d_2b_3x3: ConvBN
    conv2d_3b_1x1: ConvBN
    conv2d_4a_3x3: ConvBN
    mixed_5b: InceptionA
    mixed_5c: InceptionA
    mixed_5d: InceptionA
    mixed_6a: InceptionB
    mixed_6b: InceptionC
    mixed_6c: InceptionC
    mixed_6d: InceptionC
    mixed_6e: InceptionC
    mixed_7a: InceptionD
    mixed_7b: InceptionE
    mixed_7c: InceptionE
    fc_weight: Float[Array, "1008 2048"]

    def __init__(self):
        self.conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.mixed_5b = InceptionA(192, 32)
        self.mixed_5c = InceptionA(256, 64)
        self.mixed_5d = InceptionA(288, 64)
        self.mixed_6a = InceptionB(288)
        self.mixed_6b = InceptionC(768, 128)
        self.mixed_6c = InceptionC(768, 160)
        self.mixed_6d = InceptionC(768, 160)
        self.mixed_6e = InceptionC(768, 192)
        self.mixed_7a = InceptionD(768)
        self.mixed_7b = InceptionE(1280, "avg")
        self.mixed_7c = InceptionE(2048, "max")
        self.fc_weight = jnp.zeros((NUM_CLASSES, 2048))

    def __call__(self, x: Float[Array, "299 299 3"]) -> InceptionOutput:
        x = self.conv2d_2b_3x3(self.conv2d_2a_3x3(self.conv2d_1a_3x3(x)))
        x = _max_pool(x, stride=2)
        x = self.conv2d_4a_3x3(self.conv2d_3b_1x1(x))
        x = _max_pool(x, stride=2)
        x = self.mixed_5d(self.mixed_5c(self.mixed_5b(x)))
        x = self.mixed_6d(self.mixed_6c(self.mixed_6b(self.mixed_6a(x))))
        spatial = x[:, :, :SPATIAL_CHANNELS].reshape(-1)
        x = self.mixed_7c(self.mixed_7b(self.mixed_7a(self.mixed_6e(x))))
        pool = x.mean(axis=(0, 1))
        logits = jnp.matmul(self.fc_weight, pool, precision=jax.lax.Precision.HIGHEST)
        return InceptionOutput(pool, spatial, logits)


# ------------------------------------------------------------------------ preprocessing


def _bilinear_matrix(n_in: int, n_out: int, resize: Resize) -> np.ndarray:
    """(n_out, n_in) matrix of a two-tap bilinear resize of one axis.

    "pytorch-fid": `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel
    centres, positions clamped at 0). "tensorflow": TF1's `ResizeBilinear` inside the
    graph ADM feeds (`align_corners=False` without half-pixel centres: output pixel i
    samples input position i * n_in / n_out).
    """
    if resize == "pytorch-fid":
        _, src = sample_positions(n_in, n_out, offset=0.5)
        src = np.maximum(src, 0.0)
    elif resize == "tensorflow":
        scale = np.float32(n_in) / np.float32(n_out)
        src = (np.arange(n_out, dtype=np.float32) * scale).astype(np.float64)
    else:
        raise ConfigError(f"resize must be 'pytorch-fid' or 'tensorflow', got {resize!r}")
    left = np.floor(src).astype(np.int64)
    t = (src - left).astype(np.float32)
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, np.minimum(left, n_in - 1)), 1 - t)
    np.add.at(weights, (rows, np.minimum(left + 1, n_in - 1)), t)
    return weights


def preprocess(
    image: Shaped[Array | np.ndarray, "H W 3"], resize: Resize = "tensorflow"
) -> Float[Array, "299 299 3"]:
    """One uint8 HWC image (values in [0, 255]) to the network's 299x299 input in [-1, 1].

    The default is ADM's (its reference batches' statistics were computed that way), so FIDs
    sit next to published ones; "pytorch-fid" reproduces that package's numbers instead.

    "pytorch-fid" (its `InceptionV3(resize_input=True, normalize_input=True)`): x / 255,
    bilinear resize with half-pixel centres, then 2x - 1. "tensorflow" (the graph ADM's
    evaluator runs, as NVlabs' `inception-2015-12-05.pt` emulates it): TF1's legacy
    bilinear resize of the [0, 255] values, then (x - 128) / 128.
    """
    x = jnp.asarray(image).astype(jnp.float32)
    height, width, _ = x.shape
    rows = jnp.asarray(_bilinear_matrix(height, SIZE, resize), jnp.float32)
    cols = jnp.asarray(_bilinear_matrix(width, SIZE, resize), jnp.float32)

    def resized(x):
        return jnp.einsum("hwc,Hh,Ww->HWc", x, rows, cols, precision=jax.lax.Precision.HIGHEST)

    if resize == "pytorch-fid":
        return 2 * resized(x / 255) - 1
    return (resized(x) - 128) / 128


@eqx.filter_jit
def _batch(model: InceptionV3, images, resize: Resize) -> InceptionOutput:
    return jax.vmap(lambda image: model(preprocess(image, resize)))(images)


def inception_features(
    model: InceptionV3,
    images: Shaped[np.ndarray, "N H W 3"],
    *,
    batch_size: int = 64,
    resize: Resize = "tensorflow",
    progress: bool = True,
    console=None,
) -> InceptionOutput:
    """`InceptionOutput` of float32 numpy arrays for uint8 NHWC images, batch by batch."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"expected NHWC images with 3 channels, got shape {images.shape}")
    if len(images) == 0:
        raise ConfigError("no images")
    return map_batches(
        lambda batch: _batch(model, jnp.asarray(batch), resize),
        images,
        batch_size=batch_size,
        label="inception",
        progress=progress,
        console=console,
    )


# ----------------------------------------------------------------------------- loading


def _is_conv(x) -> bool:
    return isinstance(x, ConvBN)


def _convs(model) -> list[tuple[str, ConvBN]]:
    """(attribute path, conv) of every conv, in field order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_conv)
    return [(".".join(k.name for k in path), c) for path, c in flat if _is_conv(c)]


def _prefixes(skeleton: InceptionV3) -> list[tuple[str, str]]:
    """(pytorch-fid prefix, our attribute path) of every conv."""
    # mixed_5b.branch1x1 -> Mixed_5b.branch1x1, conv2d_1a_3x3 -> Conv2d_1a_3x3
    return [(path[0].upper() + path[1:], path) for path, _ in _convs(skeleton)]


def targets(skeleton: InceptionV3) -> list[Target]:
    """Where each pytorch-fid tensor goes: per conv, its weight, and its batch norm's four
    vectors stacked into the (4, out) slot that `_fold` turns into the bias."""
    targets = [Target("fc.weight", lambda m: m.fc_weight)]
    for prefix, path in _prefixes(skeleton):
        get = operator.attrgetter(path)
        bn = [f"{prefix}.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
        targets.append(Target(f"{prefix}.conv.weight", lambda m, get=get: get(m).weight))
        targets.append(Target(bn, lambda m, get=get: get(m).bias))
    return targets


def _fold(conv: ConvBN) -> ConvBN:
    """Batch norm (inference) folded into the conv, in float64."""
    gamma, beta, mean, var = np.asarray(conv.bias, np.float64)
    scale = gamma / np.sqrt(var + BN_EPS)
    weight = np.asarray(conv.weight, np.float64) * scale[:, None, None, None]
    bias = beta - mean * scale
    return eqx.tree_at(
        lambda c: (c.weight, c.bias),
        conv,
        (jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32)),
    )


def from_state_dict(tensors: dict[str, np.ndarray]) -> InceptionV3:
    """An `InceptionV3` from pytorch-fid's state dict (`fc.bias` is unused; see module doc)."""
    skeleton = jax.eval_shape(InceptionV3)
    convs = [c for _, c in _convs(skeleton)]
    stats = [jax.ShapeDtypeStruct((4, c.bias.shape[0]), jnp.float32) for c in convs]
    skeleton = eqx.tree_at(lambda m: [c.bias for _, c in _convs(m)], skeleton, stats)
    # Batch counters are training state; newer torch versions save them, older do not.
    counters = {f"{prefix}.bn.num_batches_tracked" for prefix, _ in _prefixes(skeleton)}
    ignored = {"fc.bias", *counters}
    model = fill(skeleton, tensors, targets(skeleton), what="the FID InceptionV3", ignored=ignored)
    return jax.tree.map(lambda x: _fold(x) if _is_conv(x) else x, model, is_leaf=_is_conv)


def _download(target: Path) -> None:
    """`URL` to `target` through a temporary file, checked against `SHA256_PREFIX`."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    digest = hashlib.sha256()
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as file, urllib.request.urlopen(URL, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (*Progress.get_default_columns()[:2], DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns) as bar:
                task = bar.add_task(f"downloading {FILENAME}", total=total)
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
        if not digest.hexdigest().startswith(SHA256_PREFIX):
            raise OSError(f"got SHA-256 {digest.hexdigest()[:8]}..., expected {SHA256_PREFIX}...")


def inception_weights_file(path: str | Path | None = None, *, download: bool = True) -> Path:
    """`path`, or the cached weights file, downloaded into the cache first if absent and
    allowed."""
    if path:
        if not Path(path).is_file():
            raise InceptionWeightsNotFound(f"{path} does not exist")
        return Path(path)
    target = cache_dir() / "inception" / FILENAME
    if target.exists():
        return target
    reason = "downloads are off"
    if download:
        try:
            _download(target)
            return target
        except OSError as error:  # URLError and timeouts are OSErrors too
            reason = f"download failed: {error}"
    raise InceptionWeightsNotFound(
        f"FID Inception weights not found ({reason}): put {FILENAME} (from {URL}) at {target}"
    )


def load_inception(path: str | Path | None = None, *, download: bool = True) -> InceptionV3:
    """The FID InceptionV3 from pytorch-fid's weights file.

    `path` defaults to `cache_dir()/inception/pt_inception-2015-12-05-6726825d.pth`,
    downloaded from pytorch-fid's GitHub release if absent (unless `download=False`).
    Both torch.save formats are read without torch, refusing anything but tensors.
    """
    return from_state_dict(read_state_dict(inception_weights_file(path, download=download)))
