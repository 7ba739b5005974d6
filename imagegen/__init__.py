"""imagegen: offline batch rendering for Stable Diffusion."""

__version__ = "0.1.0"
