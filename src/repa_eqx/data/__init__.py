"""Data: in-memory pixel datasets (MNIST-5k, photo crops) and a deterministic batch order,
the latent-shard format (`shards.py`) with its writer (`writer.py`, `repa preprocess`) and its
reader (the grain pipeline, `pipeline.py`), and target features cached per dataset
(`features.py`)."""
