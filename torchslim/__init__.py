"""torchslim: TF-Slim's training system for PyTorch."""

__version__ = "0.1.0"
