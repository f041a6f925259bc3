"""Network building blocks shared by the trained and the ported networks: dense layers with
bf16 products, float32 norms, attention (its implementation chosen by backend and dtype),
initialisers, and PyTorch's bicubic resize."""
