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

import dataclasses
import hashlib
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..core.batching import map_batches
from ..core.files import write_json
from ..core.version import version
from ..data.datasets import ImageDataset
from ..evaluation.adm import frechet_distance, gaussian_statistics
from ..evaluation.fd_dinov2 import dinov2_statistics, load_fd_model, reference_statistics
from ..evaluation.mnist_net import load_mnist_net, mnist_accuracy, mnist_features
from ..evaluation.representation import cknna, linear_probe, sit_features
from ..model.sit import SiT
from ..sampling.samples import SamplerSpec, choose_labels, generate, save_samples
from ..spaces import Pixels
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

_SAMPLE_METRICS = {"fd_mnist", "class_accuracy", "fd_dinov2"}


def _fd(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    mu, sigma = gaussian_statistics(features)
    return float(frechet_distance(mu, sigma, *reference, method="eigh"))


def _nchw(images_nhwc: np.ndarray, channels: int) -> np.ndarray:
    return images_nhwc.transpose(0, 3, 1, 2)[:, :channels]


def _rgb(images_nchw: np.ndarray) -> np.ndarray:
    """NCHW images as ADM's NHWC with 3 channels (grey repeated)."""
    images = images_nchw.transpose(0, 2, 3, 1)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class Monitor:
    """Scores the EMA model every `eval.every` steps. With `out_dir`, every evaluation's
    samples are kept there (`step_NNNNNNN.npz`, ADM's layout, with how they were made), beside
    the real images they are compared with (`reference.npz`) and the evaluation card
    (`card.json`: how every number is made), so any number can be recomputed offline."""

    def __init__(
        self,
        recipe: Recipe,
        dataset: ImageDataset,
        *,
        target_features: np.ndarray | None = None,
        encoder=None,
        progress: bool = False,
        out_dir: Path | None = None,
    ):
        spec = recipe.eval
        self.spec, self.recipe = spec, recipe
        self.metrics = tuple(dict.fromkeys(spec.metrics))
        # A fixed random subset: datasets may be stored sorted by class.
        subset = np.random.default_rng(0).permutation(len(dataset))[: spec.num_real]
        self.real = dataset.images[subset]
        self.labels = dataset.labels[subset]
        self.num_classes = dataset.num_classes
        self.out_dir = out_dir
        self.sampler = SamplerSpec(
            "ddpm" if recipe.loss.objective == "ddpm" else "ode",
            spec.sample_steps,
            cfg_scale=spec.cfg_scale,
            path=recipe.loss.path,
            shift=spec.shift,
        )
        self.card = self._card(dataset.name)
        if {"fd_mnist", "class_accuracy"} & set(self.metrics):
            if dataset.name != "mnist-5k":
                raise RecipeError("recipe key 'eval.metrics': fd_mnist and class_accuracy "
                                  "need dataset 'mnist-5k'")  # fmt: skip
            self.mnist_net = load_mnist_net(progress=progress)
            self.mnist_reference = gaussian_statistics(
                mnist_features(self.mnist_net, self.real, batch_size=self._batch(500))
            )
        if "fd_dinov2" in self.metrics:
            self.dinov2 = load_fd_model(spec.fd_dinov2_id, resolution=spec.fd_dinov2_resolution)
            self.dinov2_reference = reference_statistics(  # cached by model and images
                self.real,
                spec.fd_dinov2_id,
                resolution=spec.fd_dinov2_resolution,
                model=self.dinov2,
                batch_size=self._batch(64),
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
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_samples(out_dir / "reference.npz", _rgb(self.real), self.labels)
            write_json(out_dir / "card.json", self.card)

    def _batch(self, default: int) -> int:
        return self.spec.batch_size or default

    def _card(self, dataset: str) -> dict:
        """How each number of this run's evaluations is made."""
        spec, recipe = self.spec, self.recipe
        digest = hashlib.sha256(self.real.tobytes()).hexdigest()
        per_metric = {
            "fd_mnist": "Frechet distance (eigh square root) of the 128-d penultimate features "
            "of repa-eqx's MNIST classifier (evaluation/mnist_net.py, trained once, seeded)",
            "class_accuracy": "the fraction of samples that classifier reads as their class",
            "fd_dinov2": f"Frechet distance (eigh square root) of {spec.fd_dinov2_id}'s CLS "
            f"token at {spec.fd_dinov2_resolution} px (bicubic resize with antialias, ImageNet "
            "normalisation)",
            "cknna": f"CKNNA (k = 10) of the SiT's token-mean hidden state after block "
            f"{spec.layer or 'encoder_depth'} on the real images noised to t = {spec.t} (noise "
            f"seed {recipe.train.seed + 3}, null label) against the first target encoder's "
            f"({recipe.encoders[0].id if recipe.encoders else 'none'}) token-mean features",
            "linear_probe": "top-1 of a logistic regression (AdamW, 500 steps) on those SiT "
            "features, trained on four fifths of the real images, tested on the rest",
        }
        return {
            "model": "the EMA weights at the step of each evaluation",
            "samples": {
                "num": spec.num_samples,
                "labels": "class-balanced",
                "seed": recipe.train.seed + 2,
                "noise": "the same at every evaluation",
                "sampler": dataclasses.asdict(self.sampler),
                "files": "step_NNNNNNN.npz (ADM layout)",
            },
            "reference": {
                "dataset": dataset,
                "num_images": int(len(self.real)),
                "subset": "the first num_real of a permutation drawn with seed 0",
                "sha256": digest,
                "file": "reference.npz",
            },
            "metrics": {m: per_metric[m] for m in self.metrics},
            "batch_size": spec.batch_size,
            "repa_eqx": version(),
        }

    def __call__(self, sit: SiT, step: int) -> dict[str, float]:
        spec, out = self.spec, {}
        if _SAMPLE_METRICS & set(self.metrics):
            labels = choose_labels(spec.num_samples, self.num_classes, balanced=True)
            # The same noise at every evaluation: differences come from the model alone.
            card = {**self.card["samples"], "model": f"EMA at step {step}", "num": spec.num_samples}
            images = generate(
                sit,
                self.sampler,
                num=spec.num_samples,
                labels=labels,
                seed=self.recipe.train.seed + 2,
                batch_size=self._batch(min(spec.num_samples, 250)),
                progress=False,
            ).images
            if self.out_dir is not None:
                save_samples(self.out_dir / f"step_{step:07d}.npz", images, labels, card=card)
            channels = self.real.shape[1]
            if "fd_mnist" in self.metrics or "class_accuracy" in self.metrics:
                digits = _nchw(images, channels)
                batch = self._batch(500)
                if "fd_mnist" in self.metrics:
                    out["fd_mnist"] = _fd(
                        mnist_features(self.mnist_net, digits, batch_size=batch),
                        self.mnist_reference,
                    )
                if "class_accuracy" in self.metrics:
                    out["class_accuracy"] = mnist_accuracy(
                        self.mnist_net, digits, labels, batch_size=batch
                    )
            if "fd_dinov2" in self.metrics:
                mu, sigma = dinov2_statistics(
                    _nchw(images, 3), self.dinov2, resolution=spec.fd_dinov2_resolution,
                    batch_size=self._batch(64), progress=False,
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
                    batch_size=self._batch(256),
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
