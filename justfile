# repa-eqx tasks. `just` comes from the rust-just package (in the test extras).

# The offline demo: MNIST-5k, a small SiT, REPA against the offline DINOv2-S teacher.
quickstart:
    repa train recipes/quickstart.toml

# The default test suite: everything but the subprocess and multi-device tests.
test *ARGS:
    pytest -q {{ARGS}}

# Every test, the slow ones too (what CI runs).
test-all *ARGS:
    pytest -q -m "slow or not slow" {{ARGS}}

# Train-step speed, images/s, model FLOP utilisation and compile time.
bench *ARGS:
    python benchmarks/bench_train_step.py {{ARGS}}

# The GPU device check: step time, MFU, memory and sampling speed of SiT-B/2 and XL/2, < 8 min.
# `just device-check --smoke` runs its tiny version on a CPU.
device-check *ARGS:
    bash benchmarks/device_check.sh {{ARGS}}

# Style, and the architecture's import contracts (pyproject.toml, ARCHITECTURE.md).
lint:
    ruff check src cli tests benchmarks
    ruff format --check src cli tests benchmarks
    lint-imports

# REPA's family (vanilla, REPA, iREPA, HASTE, REG, dispersive) on MNIST-5k and photo crops,
# 3 seeds each: docs/results/family_study.md and .png. Needs scikit-image (the test install).
study *ARGS:
    python benchmarks/family_study.py {{ARGS}}

# The earlier pair: vanilla SiT vs SiT + REPA on MNIST, one seed (docs/results/mnist_study.md).
study-mnist *ARGS:
    python benchmarks/study.py {{ARGS}}

# Per-step cost of each alignment method (vanilla, REPA, iREPA, HASTE, REG, dispersive) vs REPA.
bench-methods *ARGS:
    python benchmarks/bench_methods.py {{ARGS}}

# Evaluation throughput: Inception and DINOv2 feature extraction of a sample .npz, ours vs PyTorch.
bench-eval *ARGS:
    python benchmarks/bench_eval.py {{ARGS}}

# Sampling speed against the reference's loop in PyTorch (same weights and noise), one run.
bench-sample *ARGS:
    python benchmarks/bench_sample.py {{ARGS}}
