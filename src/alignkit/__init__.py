"""alignkit: align, evaluate, compress and apply language models from one toolkit."""

__version__ = "0.1.0"
