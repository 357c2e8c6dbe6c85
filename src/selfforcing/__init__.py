"""selfforcing: train and stream autoregressive video diffusion models with Self Forcing."""

__version__ = "0.1.0"
