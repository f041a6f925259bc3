"""Evaluation throughput: images/s of the feature extraction behind `repa evaluate`, ours
against the PyTorch reference on the same images in the same run.

    python benchmarks/bench_eval.py --num 256 --dinov2-num 64 --batch-size 64

A sample `.npz` in ADM's layout (`arr_0`: uint8 NHWC 256x256 random images) is written to a
temporary folder, then each network reads it and extracts its features:

- InceptionV3 (FID, sFID, IS, precision / recall). Ours: `adm.load_samples`, then
  `inception_features` (`core.batching.map_batches`, the bilinear resize to 299, the
  network; pool, spatial and logits: all the suite reads) on `load_inception`'s network.
  Reference: pytorch-fid's `InceptionV3([pool3])`, transcribed in torch_fid_inception.py
  (torchvision does not import beside torch 2.13.0+cpu), which stops at pool3: it computes
  a little less than ours. Both resize as pytorch-fid does (`resize="pytorch-fid"`);
  `repa evaluate`'s default, ADM's TF resize, is the same two matrices with other values.
- DINOv2 ViT-L/14 at 224 px (FD-DINOv2: `fd_dinov2.DEFAULT_MODEL` is facebook/dinov2-large).
  Ours: `load_samples`, NCHW as the suite passes them, `cls_features` (bicubic resize with
  antialias, ImageNet normalisation, the CLS token after the final LayerNorm) on
  `fd_dinov2.load_fd_model`'s network. Reference: EDM2's detector input (x / 255,
  `F.interpolate(bicubic, antialias)` to 224, normalisation) into transformers'
  `Dinov2Model` (its default SDPA attention), `pooler_output`.

Weights are random (the released ones cannot be downloaded here) and shared: the torch
networks are saved to the temporary folder and ours load those files through the library's
own loaders. Random weights cost what trained ones do. The features of both sides are
compared on the timed outputs (the run stops if they differ by more than the parity tests
allow).

Timing: each side first runs one batch (ours: the compile; the padded last batch reuses the
same compiled function), then `--repeats` full passes alternate ours / reference, each from
reading the `.npz` to the last feature; images/s is the best pass of each side (other
processes only ever slow a pass down). fp32 on both sides: the library has no bf16 path for
these networks. Needs the test extras (torch, transformers).
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch_fid_inception import FIDInception, randomised  # beside this script, on sys.path
from transformers import Dinov2Config, Dinov2Model

from repa_eqx.core.xla_flags import configure_xla_gpu
from repa_eqx.evaluation import fd_dinov2
from repa_eqx.evaluation.adm import load_samples
from repa_eqx.pretrained.dinov2 import cls_features
from repa_eqx.pretrained.inception import inception_features, load_inception

SIZE = 256
# facebook/dinov2-large's architecture (its config.json), the default FD-DINOv2 model.
DINOV2_L = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
# The parity tests' tolerances: Inception's pool features to 1e-3 of their largest value
# (tests/test_inception.py), DINOv2's CLS features to 1e-4 absolute (tests/test_fd_dinov2.py,
# on a 2-layer model; 24 layers of float32 rounding are allowed 10x that).
INCEPTION_RTOL = 1e-3
DINOV2_ATOL = 1e-3


def write_samples(folder: Path, num: int, seed: int) -> Path:
    """A sample batch in ADM's layout: uint8 NHWC images under `arr_0`."""
    images = np.random.default_rng(seed).integers(0, 256, (num, SIZE, SIZE, 3), dtype=np.uint8)
    path = folder / "samples.npz"
    np.savez(path, arr_0=images)
    return path


def read_reference(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["arr_0"]


def torch_batches(images: np.ndarray, batch_size: int):
    """uint8 NHWC batches as float NCHW tensors in [0, 1] (torchvision's ToTensor)."""
    for lo in range(0, len(images), batch_size):
        yield torch.from_numpy(images[lo : lo + batch_size]).permute(0, 3, 1, 2).float() / 255


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def alternate(ours, reference, repeats: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """`repeats` passes of each, alternating; the seconds of every pass and the last outputs."""
    seconds = {"ours": [], "reference": []}
    for _ in range(repeats):
        out_ours, s = timed(ours)
        seconds["ours"].append(s)
        out_ref, s = timed(reference)
        seconds["reference"].append(s)
    return seconds, out_ours, out_ref


def bench_inception(npz: Path, folder: Path, num: int, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    calibration = next(torch_batches(load_samples(npz)[:8], 8))
    reference = randomised(FIDInception(), calibration)
    weights = folder / "fid_inception.pth"
    torch.save(reference.state_dict(), weights)
    model = load_inception(weights)

    def ours(limit):
        images = load_samples(npz)[:limit]
        return inception_features(
            model, images, batch_size=batch_size, resize="pytorch-fid", progress=False
        )

    def theirs(limit):
        with torch.no_grad():
            batches = torch_batches(read_reference(npz)[:limit], batch_size)
            return np.concatenate([reference.pool3(x).numpy() for x in batches])

    _, first_ours = timed(lambda: ours(min(batch_size, num)))
    _, first_ref = timed(lambda: theirs(min(batch_size, num)))
    seconds, out, ref = alternate(lambda: ours(num), lambda: theirs(num), repeats)
    error = float(np.abs(out.pool - ref).max() / np.abs(ref).max())
    if not error <= INCEPTION_RTOL:
        raise RuntimeError(f"Inception pool features differ: {error:.2e} of their scale")
    return dict(
        network="InceptionV3 (FID)",
        input="256 -> 299 bilinear",
        first_batch_s={"ours": first_ours, "reference": first_ref},
        seconds=seconds,
        difference=f"{error:.1e} rel",
    )


def bench_dinov2(
    npz: Path, folder: Path, num: int, batch_size: int, repeats: int, config: dict = DINOV2_L
) -> dict:
    """`config`: the DINOv2's architecture (transformers' `Dinov2Config` fields)."""
    torch.manual_seed(0)
    reference = Dinov2Model(Dinov2Config(**config)).eval()
    with torch.no_grad():  # off its init (layer scale 1, zero biases), as trained weights are
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))
    checkpoint = folder / "dinov2-large"
    reference.save_pretrained(checkpoint)
    resolution = fd_dinov2.RESOLUTION
    model = fd_dinov2.load_fd_model(str(checkpoint), resolution=resolution)

    def ours(limit):
        images = load_samples(npz)[:limit].transpose(0, 3, 1, 2)  # as the suite passes them
        return cls_features(model, images, resolution, batch_size=batch_size, progress=False)

    def theirs(limit):
        parts = []
        with torch.no_grad():
            for x in torch_batches(read_reference(npz)[:limit], batch_size):
                x = F.interpolate(x, size=(resolution,) * 2, mode="bicubic", antialias=True)
                x = (x - IMAGENET_MEAN) / IMAGENET_STD
                parts.append(reference(pixel_values=x).pooler_output.numpy())
        return np.concatenate(parts)

    _, first_ours = timed(lambda: ours(min(batch_size, num)))
    _, first_ref = timed(lambda: theirs(min(batch_size, num)))
    seconds, out, ref = alternate(lambda: ours(num), lambda: theirs(num), repeats)
    error = float(np.abs(out - ref).max())
    if not error <= DINOV2_ATOL:
        raise RuntimeError(f"DINOv2 CLS features differ by {error:.2e}")
    return dict(
        network="DINOv2 ViT-L/14 (FD-DINOv2)",
        input=f"256 -> {resolution} bicubic AA",
        first_batch_s={"ours": first_ours, "reference": first_ref},
        seconds=seconds,
        difference=f"{error:.1e} abs",
    )


def summarise(row: dict, num: int) -> dict:
    best = {side: min(times) for side, times in row["seconds"].items()}
    rate = {side: num / s for side, s in best.items()}
    return row | dict(
        num=num,
        images_per_s=rate,
        ratio_ours_over_reference=rate["ours"] / rate["reference"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=256, help="images in the sample .npz")
    parser.add_argument(
        "--dinov2-num",
        type=int,
        default=64,
        help="of those, how many DINOv2 ViT-L reads (it is about 10x slower than Inception)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="as `repa evaluate`'s")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each side")
    parser.add_argument(
        "--networks", default="inception,dinov2", help="comma-separated: inception,dinov2"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    configure_xla_gpu()  # before JAX starts its backend
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    if unknown := set(networks) - {"inception", "dinov2"}:
        parser.error(f"unknown networks {sorted(unknown)}: choose from inception, dinov2")
    if min(args.num, args.dinov2_num, args.batch_size, args.repeats) < 1:
        parser.error("--num, --dinov2-num, --batch-size and --repeats must be >= 1")

    log = Console(stderr=True)
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        npz = write_samples(folder, args.num, seed=0)
        if "inception" in networks:
            log.print(f"InceptionV3: {args.num} images, batch {args.batch_size}")
            row = bench_inception(npz, folder, args.num, args.batch_size, args.repeats)
            rows.append(summarise(row, args.num))
        if "dinov2" in networks:
            num = min(args.num, args.dinov2_num)
            log.print(f"DINOv2 ViT-L/14: {num} images, batch {args.batch_size}")
            row = bench_dinov2(npz, folder, num, args.batch_size, args.repeats)
            rows.append(summarise(row, num))
    load = (*load, *os.getloadavg())

    table = Table(
        title=f"Feature extraction of a sample .npz, fp32, batch {args.batch_size}",
        caption=f"images/s: the best of {args.repeats} passes, .npz read included",
    )
    headers = ["network", "input", "images", "ours img/s", "reference img/s", "ours / ref"]
    headers += ["first batch s (ours / ref)", "features differ"]
    for header in headers:
        table.add_column(header, justify="left" if header in headers[:2] else "right")
    for r in rows:
        table.add_row(
            r["network"],
            r["input"],
            str(r["num"]),
            f"{r['images_per_s']['ours']:.2f}",
            f"{r['images_per_s']['reference']:.2f}",
            f"{r['ratio_ours_over_reference']:.2f}x",
            f"{r['first_batch_s']['ours']:.1f} / {r['first_batch_s']['reference']:.1f}",
            r["difference"],
        )
    console = Console(width=None if Console().is_terminal else 140)
    console.print(table)
    console.print(
        f"reference: PyTorch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{os.cpu_count()} cores; load average {load[0]:.1f} before, {load[3]:.1f} after."
    )
    if args.json:
        report = dict(
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            batch_size=args.batch_size,
            repeats=args.repeats,
            load_average_before_after=[load[0], load[3]],
            rows=rows,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
