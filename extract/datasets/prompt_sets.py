"""Named prompt sets for class-prompt stores: which name stands for each class in a prompt, and which templates.

- `standard`: the dataset's class names as its reader spells them (devkit / mmsegmentation: "diningtable") in the
  reader's templates (CLIP_TEMPLATES unless the reader knows better). What `--protocol standard` scores with.
- `pal`: the PAL authors' segmentation prompts (shiwonkim/PAL_working, src/evaluation/zero_shot_segmentation.py:
  the *_CLASS_PROMPTS / *_PROMPTS dicts, and the `ensemble` text strategy = the 80 OpenAI ImageNet templates of
  src/evaluation/zero_shot_metadata.py, DATASETS_TO_TEMPLATES["imagenet"]). They wrote prompts for VOC 2012,
  PASCAL-Context and ADE20K only; for other datasets there is no `pal` set (extraction says so). What
  `--protocol pal` scores with.
A prompt store always records the dataset's own class names as `classes` (so results name classes the same way under
both sets); a `pal` store adds `prompts: pal` and the names it wrote (`prompt_names`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import PipeError
from .ade20k import ADE20K_CLASSES
from .pascal_context import PASCAL_CONTEXT_CLASSES
from .voc import VOC_CLASSES

PROMPT_SETS = ("standard", "pal")

# The authors' `ensemble` templates, in their order (= OpenAI's 80 ImageNet templates).
PAL_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# dataset -> (the class list the authors' names are for, {our name: their prompt name} where they differ). Their
# ADE20K list has "background" where mmsegmentation (and this tool) has "other" at index 0; their Pascal-Context
# list is the same 60 names in another order (matched by name, not index).
_PAL_RENAMES = {"pottedplant": "potted plant", "tvmonitor": "tv monitor"}
PAL_NAMES: dict[str, tuple[list[str], dict[str, str]]] = {
    "voc": (VOC_CLASSES, {"diningtable": "dining table", **_PAL_RENAMES}),
    "pascal-context": (PASCAL_CONTEXT_CLASSES, _PAL_RENAMES),
    "pascal-context-59": (PASCAL_CONTEXT_CLASSES, _PAL_RENAMES),
    "pascal-context-mat": (PASCAL_CONTEXT_CLASSES, _PAL_RENAMES),
    "ade20k": (ADE20K_CLASSES, {"other": "background"}),
}


@dataclass(frozen=True)
class PromptSet:
    name: str  # "standard" | "pal"
    names: tuple[str, ...]  # the name written into the prompts for each class (index = class index)
    templates: tuple[str, ...]


def has_pal_prompts(dataset: str, classes: Sequence[str] | None) -> bool:
    """Whether the PAL authors wrote prompts for this dataset's classes (a VOC layout with its own classes.txt is
    not PASCAL VOC)."""
    entry = PAL_NAMES.get(dataset)
    return entry is not None and classes is not None and list(classes) == list(entry[0])


def prompt_set(name: str, dataset: str, classes: Sequence[str], templates: Sequence[str]) -> PromptSet:
    """The prompt set `name` for a dataset's classes; `templates` are the standard set's (the reader's or
    --templates)."""
    if name not in PROMPT_SETS:
        raise PipeError(f"--prompts must be one of {', '.join(PROMPT_SETS)}, got {name!r}")
    if name == "standard":
        return PromptSet(name, tuple(classes), tuple(templates))
    if not has_pal_prompts(dataset, classes):
        sets = ", ".join(PAL_NAMES)
        raise PipeError(
            f"--prompts pal: the PAL authors wrote prompts for {sets} (their class lists) only, not for "
            f"{dataset} with classes {', '.join(classes[:3])}, ...; use the standard prompts"
        )
    renames = PAL_NAMES[dataset][1]
    return PromptSet(name, tuple(renames.get(c, c) for c in classes), PAL_TEMPLATES)


def prompt_store_suffix(name: str) -> str:
    """What follows the encoder in a class-prompt store's file name: `.prompts` (standard) or `.pal.prompts`. Both end
    in `.prompts.zarr`, which training never reads as captions."""
    return ".prompts" if name == "standard" else f".{name}.prompts"
