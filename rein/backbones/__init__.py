"""Backbones: frozen timm models refined by Rein."""
from .timm_backbone import ReinBackbone, default_out_indices, load_timm_checkpoint

__all__ = ["ReinBackbone", "default_out_indices", "load_timm_checkpoint"]
