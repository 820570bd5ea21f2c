"""rein: Rein (CVPR 2024) for frozen vision foundation models, with fused Triton kernels."""
from .layer import LoRAReins, ReinLayer, Reins

__all__ = ["ReinLayer", "Reins", "LoRAReins", "ReinBackbone", "load_official_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name):
    # timm is an optional extra: import the backbones only when asked for.
    if name == "ReinBackbone":
        from .backbones import ReinBackbone

        return ReinBackbone
    if name == "load_official_checkpoint":
        from .model import load_official_checkpoint

        return load_official_checkpoint
    raise AttributeError(f"module 'rein' has no attribute {name!r}")
