"""Network building blocks shared by the trained and the ported networks: dense layers with
bf16 products, float32 norms and attention, initialisers, and PyTorch's bicubic resize."""
