"""fuyou: fine-tune Hugging Face causal LMs far larger than GPU memory on one GPU, state on NVMe."""
__version__ = "0.1.0"

__all__ = ["__version__"]
