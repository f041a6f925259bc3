"""In-training evaluation: how sample quality and representation alignment evolve by step.

`Monitor` prepares once per run what every evaluation compares against (real images, their
features and statistics, the target encoder's features), then scores the EMA model:

- `fd_mnist`, `class_accuracy`: class-balanced samples through a small MNIST classifier
  trained once and cached (independent of the REPA teacher): Frechet distance of its
  penultimate features to the real digits', and how often a sample is read as its class;
- `fd_dinov2`: Frechet distance of the samples' DINOv2 CLS features to the real images'
  (EDM2's FD-DINOv2; the offline quickstart uses the DINOv2-S it ships);
- `cknna`: mutual k-NN kernel alignment between the SiT's hidden state after block `layer`
  on real images noised to `t` (token mean) and the first target encoder's features of the
  same images (token mean), as REPA's Fig. 2;
- `linear_probe`: top-1 accuracy of a linear classifier on those SiT features (trained on
  four fifths of the real images, tested on the rest).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from ..core.batching import map_batches
from ..data.datasets import ImageDataset
from ..evaluation.adm import frechet_distance, gaussian_statistics
from ..evaluation.fd_dinov2 import dinov2_statistics, load_fd_model, reference_statistics
from ..evaluation.mnist_net import load_mnist_net, mnist_accuracy, mnist_features
from ..evaluation.representation import cknna, linear_probe, sit_features
from ..model.sit import SiT
from ..sampling.samples import SamplerSpec, choose_labels, generate
from ..spaces import Pixels
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

_SAMPLE_METRICS = {"fd_mnist", "class_accuracy", "fd_dinov2"}


def _fd(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    mu, sigma = gaussian_statistics(features)
    return float(frechet_distance(mu, sigma, *reference, method="eigh"))


def _nchw(images_nhwc: np.ndarray, channels: int) -> np.ndarray:
    return images_nhwc.transpose(0, 3, 1, 2)[:, :channels]


class Monitor:
    def __init__(
        self,
        recipe: Recipe,
        dataset: ImageDataset,
        *,
        target_features: np.ndarray | None = None,
        encoder=None,
        progress: bool = False,
    ):
        spec = recipe.eval
        self.spec, self.recipe = spec, recipe
        self.metrics = tuple(dict.fromkeys(spec.metrics))
        # A fixed random subset: datasets may be stored sorted by class.
        subset = np.random.default_rng(0).permutation(len(dataset))[: spec.num_real]
        self.real = dataset.images[subset]
        self.labels = dataset.labels[subset]
        self.num_classes = dataset.num_classes
        if {"fd_mnist", "class_accuracy"} & set(self.metrics):
            if dataset.name != "mnist-5k":
                raise RecipeError("recipe key 'eval.metrics': fd_mnist and class_accuracy "
                                  "need dataset 'mnist-5k'")  # fmt: skip
            self.mnist_net = load_mnist_net(progress=progress)
            self.mnist_reference = gaussian_statistics(mnist_features(self.mnist_net, self.real))
        if "fd_dinov2" in self.metrics:
            self.dinov2 = load_fd_model(spec.fd_dinov2_id, resolution=spec.fd_dinov2_resolution)
            self.dinov2_reference = reference_statistics(  # cached by model and images
                self.real,
                spec.fd_dinov2_id,
                resolution=spec.fd_dinov2_resolution,
                model=self.dinov2,
                progress=progress,
            )
        if "cknna" in self.metrics:
            if target_features is not None:
                feats = np.asarray(target_features[subset], np.float32)
            elif encoder is not None:
                feats = map_batches(encoder, self.real, batch_size=250)
            else:
                raise RecipeError("recipe key 'eval.metrics': cknna needs a target encoder")
            self.encoder_features = feats.mean(axis=1) if feats.ndim == 3 else feats

    def __call__(self, sit: SiT, step: int) -> dict[str, float]:
        spec, out = self.spec, {}
        if _SAMPLE_METRICS & set(self.metrics):
            sampler = SamplerSpec(
                "ddpm" if self.recipe.loss.objective == "ddpm" else "ode",
                spec.sample_steps,
                cfg_scale=spec.cfg_scale,
                path=self.recipe.loss.path,
            )
            labels = choose_labels(spec.num_samples, self.num_classes, balanced=True)
            # The same noise at every evaluation: differences come from the model alone.
            images = generate(
                sit,
                sampler,
                num=spec.num_samples,
                labels=labels,
                seed=self.recipe.train.seed + 2,
                batch_size=min(spec.num_samples, 250),
                progress=False,
            ).images
            channels = self.real.shape[1]
            if "fd_mnist" in self.metrics or "class_accuracy" in self.metrics:
                digits = _nchw(images, channels)
                if "fd_mnist" in self.metrics:
                    out["fd_mnist"] = _fd(
                        mnist_features(self.mnist_net, digits), self.mnist_reference
                    )
                if "class_accuracy" in self.metrics:
                    out["class_accuracy"] = mnist_accuracy(self.mnist_net, digits, labels)
            if "fd_dinov2" in self.metrics:
                mu, sigma = dinov2_statistics(
                    _nchw(images, 3), self.dinov2, resolution=spec.fd_dinov2_resolution,
                    progress=False,
                )  # fmt: skip
                out["fd_dinov2"] = frechet_distance(
                    mu, sigma, *self.dinov2_reference, method="eigh"
                )
        if {"cknna", "linear_probe"} & set(self.metrics):
            x = jnp.asarray(Pixels().encode(self.real))
            key = jax.random.key(self.recipe.train.seed + 3)
            feats = np.asarray(
                sit_features(
                    sit,
                    x,
                    spec.t,
                    layer=spec.layer or sit.config.encoder_depth,
                    key=key,
                    path=self.recipe.loss.path,
                )
            )
            if "cknna" in self.metrics:
                out["cknna"] = cknna(jnp.asarray(feats), jnp.asarray(self.encoder_features))
            if "linear_probe" in self.metrics:
                cut = len(feats) * 4 // 5
                out["linear_probe"] = linear_probe(
                    feats[:cut],
                    self.labels[:cut],
                    feats[cut:],
                    self.labels[cut:],
                    num_classes=self.num_classes,
                )
        return {k: float(v) for k, v in out.items()}
