"""fastadapters: the LLM-Adapters adapter family on Hugging Face models, with fused kernels."""
__version__ = "0.1.0"
