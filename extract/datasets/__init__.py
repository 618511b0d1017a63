"""Dataset readers of real on-disk layouts, plus the procedural `world`; `get_dataset(name, root, split)` opens one.

Importing this package imports every reader module, which registers it by name (see base.register_dataset).
"""

from . import (  # noqa: F401  (register)
    ade20k,
    cifar,
    coco,
    fashion_mnist,
    flickr30k_entities,
    imagefolder,
    imagenet,
    karpathy,
    parquet,
    pascal_context,
    pascal_context_mat,
    stl10,
    tables,
    voc,
    webdataset,
    world,
)
from .base import (
    CLIP_TEMPLATES,
    DATASETS,
    Caption,
    Dataset,
    Entity,
    Grounding,
    ImageRecord,
    Phrase,
    UnreadableImage,
    dataset_class,
    get_dataset,
    register_dataset,
)
from .world import World
from .world_write import write_world

__all__ = [
    "CLIP_TEMPLATES",
    "DATASETS",
    "Caption",
    "Dataset",
    "Entity",
    "Grounding",
    "ImageRecord",
    "Phrase",
    "UnreadableImage",
    "World",
    "dataset_class",
    "get_dataset",
    "register_dataset",
    "write_world",
]
