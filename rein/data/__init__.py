"""Data for domain-generalised semantic segmentation; nothing here knows about models.

* ``labels``: the 19 Cityscapes train classes (ignore 255), every dataset's label map to
  them, their inverse to Cityscapes label ids, the palette;
* ``images``: reading image files, the normalisation of model inputs;
* ``datasets``: GTAV, Cityscapes, BDD100K, Mapillary Vistas v1.2 and ACDC in their
  standard layouts, checked before anything runs;
* ``synthetic``: procedurally generated street scenes in several styles (no download);
* ``transforms``: the official training pipeline (random short-edge resize, crop with
  cat_max_ratio, flip, mmseg's PhotoMetricDistortion, on uint8 pixels, driven by a
  seed so that a resumed run sees the same batches) and mmseg's test resize.
"""
from ..errors import DataError
from .datasets import KINDS, FolderDataset, datasets_from
from .images import MEAN, STD, normalize, read_image, to_uint8
from .labels import CLASSES, IGNORE, LABEL_IDS, LUTS, PALETTE, colorize, overlay
from .synthetic import STYLES, SyntheticDomain, render_scene, synthetic_train, synthetic_validation
from .transforms import augment_official, fit_scale, official_scales, rescale

__all__ = ["CLASSES", "IGNORE", "KINDS", "LABEL_IDS", "LUTS", "MEAN", "PALETTE", "STD", "STYLES", "DataError",
           "FolderDataset", "SyntheticDomain", "augment_official", "colorize", "datasets_from", "fit_scale",
           "normalize", "official_scales", "overlay", "read_image", "render_scene", "rescale", "synthetic_train",
           "synthetic_validation", "to_uint8"]
