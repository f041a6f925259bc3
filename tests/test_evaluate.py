"""`repa reference`, `repa fid` and `repa eval` end to end, with a random-weight FID Inception
written in pytorch-fid's file layout (no package ships the real weights)."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx.evaluation.adm import Statistics, compute_metrics, load_reference_batch, save_samples
from repa_eqx.evaluation.suite import evaluate
from repa_eqx.pretrained.inception import inception_features, load_inception

pytestmark = pytest.mark.standard_promotion

torch = pytest.importorskip("torch")
runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from test_inception import _images, _to_torch01, torch_fid

    torch.manual_seed(0)
    model = torch_fid.randomised(torch_fid.FIDInception(), _to_torch01(_images(4, 64, seed=2)))
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), path)
    return path


def _images(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 32, 32, 3))
    return np.clip(base + rng.integers(-40, 40, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights):
    root = tmp_path_factory.mktemp("eval")
    folder = root / "real"
    folder.mkdir()
    real = _images(8, seed=0)  # every batch the same size: one compiled shape
    for i, image in enumerate(real):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not a png")  # skipped, not fatal
    result = runner.invoke(
        app, ["reference", str(folder), str(root / "ref.npz"), "--inception", str(weights),
              "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "reference batch of 8 images" in result.output
    save_samples(root / "same.npz", real)
    save_samples(root / "other.npz", _images(8, seed=1))
    return root, real


def test_reference_batch_holds_the_images_and_their_statistics(files, weights):
    root, real = files
    images, stats = load_reference_batch(root / "ref.npz")
    np.testing.assert_array_equal(images, real)
    expected = Statistics.of(inception_features(load_inception(weights), real, progress=False))
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_eval_command_reports_the_suite(files, weights):
    root, real = files
    result = runner.invoke(
        app, ["eval", str(root / "other.npz"), "--ref", str(root / "ref.npz"), "--inception",
              str(weights), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((root / "other.metrics.json").read_text())
    assert set(report["metrics"]) == {"fid", "sfid", "inception_score", "precision", "recall"}
    # The same numbers as the metric functions on the same features.
    model = load_inception(weights)
    samples = inception_features(model, np.load(root / "other.npz")["arr_0"], progress=False)
    reference = inception_features(model, real, progress=False)
    expected = compute_metrics(samples, reference, method="eigh")
    assert report["metrics"]["fid"] == pytest.approx(expected.fid, rel=1e-6)
    assert report["metrics"]["recall"] == pytest.approx(expected.recall)
    assert report["metrics"]["fid"] > 1.0


def test_fid_of_the_reference_images_themselves_is_zero(files, weights):
    root, _ = files
    out = evaluate(
        root / "same.npz", root / "ref.npz", metrics=("fid", "precision", "recall"),
        inception_path=weights, progress=False,
    )  # fmt: skip
    # ~0 up to sqrtm's error on a rank-7 covariance in 2048 dimensions (ADM's route).
    assert abs(out["fid"]) < 0.2
    assert out["precision"] == 1.0 and out["recall"] == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fid", "missing.npz", "--ref", "ref.npz"], "missing.npz does not exist"),
        (["eval", "other.npz", "--ref", "ref.npz", "--resize", "nearest"], "resize must be"),
        (["reference", "nowhere", "x.npz"], "neither an image folder nor 'mnist-5k'"),
    ],
)
@pytest.mark.unchecked
def test_errors_are_one_line(files, weights, args, message, monkeypatch):
    root, _ = files
    monkeypatch.chdir(root)
    result = runner.invoke(app, [*args, "--inception", str(weights), "--no-progress"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
