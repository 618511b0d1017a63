"""CIFAR-10 and CIFAR-100 from the authors' python pickle batches (cifar-10-batches-py/, cifar-100-python/), read the
way torchvision reads them (pickle with latin1 strings), without importing torchvision."""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from .base import Dataset, ImageRecord, inside, register_dataset, require_root

# Class names and templates of CLIP's zero-shot evaluation (openai/CLIP data/prompts.md, "CIFAR10" / "CIFAR100";
# clip_benchmark uses the same templates). CIFAR-100's names are the meta file's with "_" written as a space.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple",
    "aquarium fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak tree",
    "orange",
    "orchid",
    "otter",
    "palm tree",
    "pear",
    "pickup truck",
    "pine tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow tree",
    "wolf",
    "woman",
    "worm",
]
CIFAR_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]


def spelled(raw: list[str]) -> list[str]:
    """The meta file's class names in CLIP's spelling ("aquarium_fish" -> "aquarium fish"): for the authors' files
    that is CLIP's list exactly; a relabelled copy keeps its own names, in its order."""
    return [n.replace("_", " ") for n in raw]


class _Cifar(Dataset):
    """One split: every batch file's pickle is read in the constructor (labels must be known before extraction; the
    pixels come in the same pickle). The pixels are kept (150 MB for train) but not pickled to dask workers, which
    read the batches again on first use."""

    splits = ("train", "test")
    labelled = True
    folder: str  # the folder the authors' archive unpacks to
    archive: str  # the archive's file name (to recognise a root that holds it still packed)
    files: dict[str, tuple[str, ...]]  # split -> batch files
    meta: tuple[str, str]  # (meta file, key of the class names)
    label_key: str

    def __init__(self, root: str | Path | None, split: str = "test") -> None:
        super().__init__(root, split)
        self.dir = self._locate(require_root(self.name, root))
        self.paths = [self._file(f) for f in self.files[split]]
        meta_path = self._file(self.meta[0])
        raw = _load(meta_path).get(self.meta[1])
        if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
            raise PipeError(f"{meta_path} has no list '{self.meta[1]}' of class names")
        self.classes = spelled(raw)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()
        labels = self._read(keep_pixels=True)
        self._records = [ImageRecord(f"{i:05d}", int(y)) for i, y in enumerate(labels)]  # torchvision's index

    def _locate(self, root: Path) -> Path:
        """root is the unpacked folder or the folder holding it (torchvision's root); anything else is one line saying
        what was expected where."""
        for cand in (root, root / self.folder):
            if (cand / self.meta[0]).is_file():
                return cand
        if (root / self.archive).is_file():
            raise PipeError(
                f"dataset '{self.name}': {root / self.archive} is still packed; unpack it there "
                f"(tar xzf {self.archive}) so that {root / self.folder} exists"
            )
        others = [f for f in ("cifar-10-batches-py", "cifar-100-python") if f != self.folder]
        other = next((root / f for f in (*others, "cifar-10-batches-bin") if (root / f).is_dir()), None)
        if other is None and root.name in (*others, "cifar-10-batches-bin"):
            other = root
        hint = f" ({other} is another dataset or the binary version)" if other is not None else ""
        raise PipeError(
            f"dataset '{self.name}': expected {root / self.folder}/{self.meta[0]} (--root is the folder "
            f"holding {self.folder}/, or that folder itself){hint}"
        )

    def _file(self, name: str) -> Path:
        path = self.dir / name
        if not path.is_file():
            raise PipeError(f"dataset '{self.name}': file not found: {path}")
        return inside(path, self.dir, "batch file")

    def _read(self, keep_pixels: bool) -> np.ndarray:
        """Labels of the split, in batch-file order; the pixels as [N, 32, 32, 3] into `_pixels` if asked."""
        pixels, labels = [], []
        for path in self.paths:
            batch = _load(path)
            data, y = batch.get("data"), batch.get(self.label_key)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                got = getattr(data, "shape", type(data).__name__)
                raise PipeError(f"{path}: 'data' must be a uint8 array of N x 3072 (3x32x32) pixels, got {got}")
            if not isinstance(y, list) or len(y) != len(data):
                size = len(y) if isinstance(y, list) else "no"
                raise PipeError(f"{path}: {len(data)} images but {size} '{self.label_key}'")
            n = len(self.classes or ())
            bad = next((v for v in y if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n), None)
            if bad is not None:  # checked as python ints: 2**70 is out of range, not an OverflowError
                raise PipeError(f"{path}: label {str(bad)[:40]} outside 0..{n - 1} ({self.meta[0]})")
            pixels.append(data)
            labels.append(np.asarray(y, dtype=np.int64))
        if keep_pixels:  # channel planes of 32 rows: [N, 3, 32, 32] -> [N, 32, 32, 3], as torchvision
            self._pixels = np.concatenate(pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.concatenate(labels)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_pixels")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _pixels=None)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        with self._lock:
            if self._pixels is None:
                self._read(keep_pixels=True)
        return Image.fromarray(np.ascontiguousarray(self._pixels[int(self._records[i].id)]), "RGB")

    def templates(self) -> list[str]:
        return list(CIFAR_TEMPLATES)


# The largest file of the authors' archives is cifar-100-python/train: 50,000 rows of 3,072 bytes plus labels and
# file names, about 158 MB. A file beyond this bound is no CIFAR batch and is not read at all.
MAX_FILE_BYTES = 256 << 20
DTYPE_NAME = re.compile(r"[biuf][1248]")  # the numeric dtypes numpy writes as its pickled dtype's name ("u1", "i8")


class _Dtype:
    """A pickled numpy dtype (numpy.dtype(name, align, copy), then its state), kept as the name and byte order only:
    what the state could say about sizes or fields is never given to numpy."""

    def __init__(self, name: object, *_: object) -> None:
        if not isinstance(name, str) or not DTYPE_NAME.fullmatch(name):
            raise pickle.UnpicklingError(f"refused dtype {str(name)[:40]!r}: a CIFAR batch holds numbers only")
        self.name, self.order = name, "|"

    def __setstate__(self, state: object) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"dtype state {str(state)[:60]} is not one numpy writes")
        self.order = order

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.name)
        return dtype if self.order in ("|", "=") else dtype.newbyteorder(self.order)


def _array(raw: object, dtype: object, shape: object, order: str = "C") -> np.ndarray:
    """The array of `shape` over the bytes `raw`, once the bytes it needs are known to be exactly the bytes given:
    a hostile shape (4e12 elements) or dtype fails here, before numpy allocates anything."""
    if isinstance(raw, str):  # python 2 pickles: the raw bytes as a latin1 string
        raw = raw.encode("latin1")
    if not isinstance(dtype, _Dtype) or not isinstance(raw, (bytes, bytearray, pickle.PickleBuffer)):
        raise pickle.UnpicklingError("array state is not (raw bytes, dtype) as numpy writes it")
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise pickle.UnpicklingError(f"array shape {str(shape)[:60]} is not a tuple of sizes")
    dt = dtype.resolve()
    need = math.prod(shape) * dt.itemsize  # python ints: no overflow
    have = memoryview(raw).nbytes
    if need != have:
        raise pickle.UnpicklingError(f"array of shape {shape[:4]} needs {need} bytes, the file gives {have}")
    return np.frombuffer(raw, dt).reshape(shape, order="F" if order == "F" else "C")


class _ArrayState:
    """numpy's _reconstruct(ndarray, (0,), dtype), then BUILD: the array is made in __setstate__ by `_array`."""

    def __init__(self, subtype: object, shape: object, dtype: object) -> None:
        if subtype is not _NDARRAY or shape != (0,):
            raise pickle.UnpicklingError("array constructor called with arguments numpy never writes")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("array state is not the tuple numpy writes")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array(raw, dtype, shape, "F" if fortran else "C")


def _frombuffer(buf: object, dtype: object, shape: object, order: str) -> np.ndarray:
    """numpy's protocol-5 array constructor, through the same checks."""
    return _array(buf, dtype, shape, order)


def _encode(text: object, encoding: object = "utf-8") -> bytes:
    """The codec call python 3 writes for bytes at protocol 2 (latin1); any other codec is refused, not looked up."""
    name = str(encoding).lower().replace("-", "").replace("_", "")
    if not isinstance(text, str) or name not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused codec {str(encoding)[:40]!r}: a CIFAR batch uses latin1 only")
    return text.encode("latin1")


_NDARRAY = object()  # stands for numpy.ndarray: only ever an argument, never called (ndarray(shape) allocates)

# What a CIFAR batch may name (python 2 and 3 module names, protocols 2 and 5), each mapped to a checked stand-in:
# numpy's array and dtype constructors and the codec call python 3 writes for bytes. Anything else (os.system, ...)
# is refused, never called.
PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayState,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayState,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}


class _BatchUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-python unpickler over the file's bytes in memory: a length field (2**62) can never make it allocate
    more than the file holds (the C unpickler allocates a field's size before reading it)."""

    def find_class(self, module: str, name: str):
        found = PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a CIFAR batch")
        return found


def _load(path: Path) -> dict:
    """One pickle batch as torchvision loads it (python 2 strings read as latin1); bytes keys (a file written from
    python 3) are read the same. Unlike pickle.load, it calls nothing but checked stand-ins of numpy's array
    constructors, and allocates nothing the file's size does not bound. A damaged or hostile file names itself."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PipeError(f"{path} is {size} bytes, more than any CIFAR batch (at most {MAX_FILE_BYTES >> 20} MiB)")
    try:
        obj = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        OverflowError,
        struct.error,
        MemoryError,
        RecursionError,
    ) as e:
        raise PipeError(f"damaged pickle file {path}: {type(e).__name__}: {e}"[:300].replace("\n", " ")) from None
    if not isinstance(obj, dict):
        raise PipeError(f"{path} is not a CIFAR batch (a pickled dict), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        key = k.decode("latin1") if isinstance(k, bytes) else k
        if isinstance(v, _ArrayState):
            if v.array is None:
                raise PipeError(f"damaged pickle file {path}: array '{key}' has no state")
            v = v.array
        elif isinstance(v, list):
            v = [x.decode("latin1") if isinstance(x, bytes) else x for x in v]
        out[key] = v
    return out


@register_dataset("cifar10")
class Cifar10(_Cifar):
    folder, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
    files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    meta, label_key = ("batches.meta", "label_names"), "labels"


@register_dataset("cifar100")
class Cifar100(_Cifar):
    """The 100 fine classes (`fine_labels`), as CLIP and clip_benchmark evaluate it."""

    folder, archive = "cifar-100-python", "cifar-100-python.tar.gz"
    files = {"train": ("train",), "test": ("test",)}
    meta, label_key = ("meta", "fine_label_names"), "fine_labels"
