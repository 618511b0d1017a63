"""Dataset readers of real on-disk layouts, plus the procedural `world`; `get_dataset(name, root, split)` opens one.

Importing this package imports every reader module, which registers it by name (see base.register_dataset).
"""

from pipe_align.extract.datasets import ade20k, coco, fashion_mnist, imagefolder, karpathy, pascal_context, voc, world  # noqa: F401,E501  (register)
from pipe_align.extract.datasets.base import (
    CLIP_TEMPLATES,
    DATASETS,
    Caption,
    Dataset,
    ImageRecord,
    UnreadableImage,
    dataset_class,
    get_dataset,
    register_dataset,
)
from pipe_align.extract.datasets.world import World
from pipe_align.extract.datasets.world_write import write_world

__all__ = [
    "CLIP_TEMPLATES",
    "DATASETS",
    "Caption",
    "Dataset",
    "ImageRecord",
    "UnreadableImage",
    "World",
    "dataset_class",
    "get_dataset",
    "register_dataset",
    "write_world",
]
