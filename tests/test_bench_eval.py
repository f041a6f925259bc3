"""benchmarks/bench_eval.py on a few small images: its PyTorch references and our entry points
give the same features (the padded last batch included), and a disagreement stops the run."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_eval imports torch_fid_inception beside it
_spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "benchmarks/bench_eval.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
TINY_DINOV2 |= dict(image_size=56)  # a 4x4 table, resampled to 16x16 for 224 px


def _check_row(row: dict, repeats: int) -> None:
    for side in ("ours", "reference"):
        assert len(row["seconds"][side]) == repeats
        assert all(s > 0 for s in row["seconds"][side])
    summary = bench.summarise(row, 3)
    rates = summary["images_per_s"]
    assert summary["ratio_ours_over_reference"] == pytest.approx(rates["ours"] / rates["reference"])
    assert rates["ours"] == pytest.approx(3 / min(row["seconds"]["ours"]))


@pytest.mark.slow  # about 20 s: a benchmark harness check (parity itself: test_inception.py)
def test_inception_matches_pytorch_fid(tmp_path):
    npz = bench.write_samples(tmp_path, 3, seed=0)
    row = bench.bench_inception(npz, tmp_path, 3, batch_size=2, repeats=1)
    assert float(row["difference"].split()[0]) <= bench.INCEPTION_RTOL
    _check_row(row, 1)


@pytest.mark.slow  # a benchmark harness check (parity itself: test_dinov2.py)
def test_dinov2_matches_transformers(tmp_path):
    npz = bench.write_samples(tmp_path, 3, seed=1)
    row = bench.bench_dinov2(npz, tmp_path, 3, batch_size=2, repeats=2, config=TINY_DINOV2)
    assert float(row["difference"].split()[0]) <= bench.DINOV2_ATOL
    _check_row(row, 2)


def test_disagreement_stops_the_run(tmp_path, monkeypatch):
    npz = bench.write_samples(tmp_path, 3, seed=2)
    monkeypatch.setattr(bench, "DINOV2_ATOL", 0.0)  # float32 rounding alone now disagrees
    with pytest.raises(RuntimeError, match="DINOv2 CLS features differ"):
        bench.bench_dinov2(npz, tmp_path, 3, batch_size=2, repeats=1, config=TINY_DINOV2)
