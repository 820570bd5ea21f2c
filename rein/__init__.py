"""rein: Rein (CVPR 2024) for frozen vision foundation models, with fused Triton kernels."""
from .layer import LoRAReins, ReinLayer, Reins

__all__ = ["ReinLayer", "Reins", "LoRAReins"]
__version__ = "0.1.0"
