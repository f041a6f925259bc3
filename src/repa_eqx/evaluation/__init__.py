"""Evaluation, one entry per metric: ADM's suite on Inception features (FID, sFID, Inception
Score, precision / recall; `adm.compute_metrics`, and `suite.evaluate` on sample files),
FD-DINOv2, the MNIST classifier's FD and class accuracy, and the representation alignment of
a SiT (CKNNA, linear probe)."""
