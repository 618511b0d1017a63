"""Every method's fitted state is a torch module: parameters and buffers as nn.Module keeps them, `.to()` moves them,
a run dir loads back bit-identically (built from method.json's config, then `load_state_dict(strict=True)`), and a
weights file that does not fit its config is a one-line PipeError naming the file. Methods come from the registry
(`method_names()`), so a new method is covered without an edit here."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipe_align.align.base import (
    METHODS,
    Aligner,
    ClosedFormAligner,
    ImageRows,
    TextRows,
    TrainedAligner,
    TrainingData,
)
from pipe_align.align.contrastive import ContrastiveHeads, LinearConfig
from pipe_align.align.data import PairSource, find_pair_stores, pair_split
from pipe_align.align.loop import RunConfig, fit
from pipe_align.align.methods import get_method, load_aligner, method_names
from pipe_align.extract.errors import PipeError

pytestmark = pytest.mark.usefixtures("one_thread")

# Small settings for the tiny world stores (18 training pairs), each applied where a method has the option.
SMALL = {"anchors": 4, "lr_finder": 0, "dim": 8, "rank": 4, "hidden": 8, "k": 8, "teacher_dim": 8, "n_iter": 10}
RUN = RunConfig(epochs=2, batch_size=8, val_fraction=0.25)
# Configurations whose saved tensors differ from the method's defaults (another head, a trained gate).
VARIANTS = {"mlp-gelu": ("mlp", {"head": "gelu"}), "mlp-gate": ("mlp", {"gate_init": 0.5})}
CASES = sorted(method_names()) + sorted(VARIANTS)

# The tensors each method's weights file held before aligners were torch modules (written down here, not read from
# the code): run dirs written then must keep loading.
OLD_KEYS = {
    "pal": {"image_anchors", "text_anchors"},
    "pal-fixed": {"image_anchors", "text_anchors"},
    "procrustes": {"mean_img", "mean_txt", "basis_img", "basis_txt", "rotation"},
    "cca": {"mean_img", "mean_txt", "proj_img", "proj_txt", "rho"},
    "csa": {"mean_img", "mean_txt", "proj_img", "proj_txt", "rho"},
    "asif": {"anchors_img", "anchors_txt"},
    "sotalign": {"mean_img", "mean_txt", "w_img", "b_img", "w_txt", "b_txt"},
    "linear": {"img.weight", "img.bias", "txt.weight", "txt.bias", "center_img", "center_txt"},
    "mlp": {f"{s}.{k}" for s in ("img", "txt") for k in ("P.weight", "W1.weight", "W2.weight", "gate")}
    | {"center_img", "center_txt"},
    "mlp-gelu": {f"{s}.{k}" for s in ("img", "txt") for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    | {"center_img", "center_txt"},
    "mlp-gate": {f"{s}.{k}" for s in ("img", "txt") for k in ("P.weight", "W1.weight", "W2.weight", "gate_logit")}
    | {"center_img", "center_txt"},
}
OLD_FILES = {"pal": "anchors.safetensors", "pal-fixed": "anchors.safetensors"}  # the others: weights.safetensors


def _method(case: str) -> tuple[type[Aligner], dict]:
    name, extra = VARIANTS.get(case, (case, {}))
    cls = get_method(name)
    known = {f.name for f in fields(cls.Config)}
    return cls, {k: v for k, v in SMALL.items() if k in known} | extra


def world_pairs(features: Path, tokens: bool) -> TrainingData:
    """The world stores' training pairs with RUN's held-out split."""
    stores = find_pair_stores(features / "world" / "train")
    split = pair_split(stores, RUN.val_fraction, RUN.seed)
    train, val = (PairSource(stores, rows, split.captions, tokens=tokens) for rows in (split.train, split.val))
    return TrainingData(train, val)


@pytest.fixture(scope="module")
def runs(world_features, tmp_path_factory):
    """case -> (fitted aligner, its saved run dir), each fitted once on the world stores."""
    base = tmp_path_factory.mktemp("module_runs")
    done: dict[str, tuple[Aligner, Path]] = {}

    def get(case: str) -> tuple[Aligner, Path]:
        if case not in done:
            cls, params = _method(case)
            config = cls.Config(**params)
            with torch.random.fork_rng(devices=[]):
                aligner = fit(cls, config, RUN, world_pairs(world_features, cls.wants_tokens(config))).aligner
            aligner.save(base / case)
            done[case] = aligner, base / case
        return done[case]

    return get


def random_rows(dim: int = 32, seed: int = 7) -> tuple[ImageRows, TextRows]:
    g = torch.Generator().manual_seed(seed)
    image = ImageRows(cls=torch.randn(5, dim, generator=g), patches=torch.randn(5, 12, dim, generator=g))
    lengths = torch.tensor([1, 3, 7, 7, 2, 5])
    text = TextRows(pooled=torch.randn(6, dim, generator=g), tokens=torch.randn(6, 7, dim, generator=g), length=lengths)
    return image, text


def outputs(aligner: Aligner, image: ImageRows, text: TextRows) -> dict[str, Tensor | None]:
    words = text.tokens[: len(image.patches)]  # one sentence per image
    return {
        "image_global": aligner.image_global(image),
        "text_global": aligner.text_global(text),
        "image_dense": aligner.image_dense(image.patches),
        "word_patch_scores": aligner.word_patch_scores(image.patches, words),
    }


def weights_of(run: Path) -> Path:
    return next(run.glob("*.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_an_aligner_is_a_torch_module(runs, case):
    fitted, run = runs(case)
    assert isinstance(fitted, nn.Module)
    named = dict(fitted.named_parameters())
    state = fitted.state_dict()
    assert set(state) == set(named) | {k for k, _ in fitted.named_buffers()}  # everything saved is a module tensor
    if isinstance(fitted, TrainedAligner):  # trained tensors are parameters: the optimiser's, the checkpoint's
        assert named and all(isinstance(p, nn.Parameter) and p.requires_grad for p in named.values())
        assert [id(p) for p in fitted.parameters()] == [id(p) for p in named.values()]
        assert all(state[k].data_ptr() == p.data_ptr() for k, p in named.items())  # the state dict *is* them
    else:
        assert isinstance(fitted, ClosedFormAligner) and not named and list(fitted.buffers())
    loaded = load_aligner(run)
    assert loaded.to("cpu") is loaded and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded to apply, not to train
    for module in loaded.modules():  # no tensor outside parameters and buffers, which `.to()` would leave behind
        assert not [k for k, v in vars(module).items() if isinstance(v, Tensor)], type(module).__name__
    loaded.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in loaded.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("case", CASES)
def test_save_then_load_is_bit_identical(runs, case):
    fitted, run = runs(case)
    loaded = load_aligner(run)
    assert type(loaded) is type(fitted) and loaded.config == fitted.config
    a, b = fitted.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    image, text = random_rows()
    want, got = outputs(fitted, image, text), outputs(loaded, image, text)
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert torch.equal(value, got[key]), key


def _rewrite(run: Path, tmp_path: Path, change) -> Path:
    """A copy of the run dir whose weights file holds change(tensors)."""
    out = tmp_path / "copy"
    out.mkdir(parents=True)
    (out / "method.json").write_text((run / "method.json").read_text())
    weights = weights_of(run)
    save_file(change(load_file(str(weights))), str(out / weights.name))
    return out / weights.name


def _one_line_refusal(weights: Path) -> str:
    with pytest.raises(PipeError) as e:
        load_aligner(weights.parent)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{weights}: "), message
    return message


@pytest.mark.parametrize("case", CASES)
def test_a_missing_or_extra_tensor_is_one_line_naming_the_file(runs, case, tmp_path):
    _, run = runs(case)
    keys = sorted(load_file(str(weights_of(run))))
    for i, key in enumerate(keys):
        weights = _rewrite(run, tmp_path / f"missing{i}", lambda s, key=key: {k: v for k, v in s.items() if k != key})
        message = _one_line_refusal(weights)
        assert "missing" in message and repr(key) in message, message
    weights = _rewrite(run, tmp_path / "extra", lambda s: s | {"stray": torch.zeros(3)})
    assert "unexpected 'stray'" in _one_line_refusal(weights)


@pytest.mark.parametrize("case", CASES)
def test_a_wrongly_shaped_tensor_is_one_line_naming_the_file(runs, case, tmp_path):
    """Every tensor in turn one row longer (a scalar: two values): its config, or the other tensors, contradict it."""
    _, run = runs(case)
    keys = sorted(load_file(str(weights_of(run))))

    def grown(state: dict[str, Tensor], key: str) -> dict[str, Tensor]:
        t = state[key]
        bigger = torch.zeros(2) if t.dim() == 0 else torch.cat([t, t[:1]])
        return state | {key: bigger.contiguous()}

    for i, key in enumerate(keys):
        weights = _rewrite(run, tmp_path / f"grown{i}", lambda s, key=key: grown(s, key))
        message = _one_line_refusal(weights)
        assert "does not hold the tensors" in message and "has shape" in message, message


def test_anchors_other_than_the_config_says_are_refused(runs, tmp_path):
    """A PAL run's method.json says K anchors: a file with fewer per bank is not another run's to adopt."""
    _, run = runs("pal")
    weights = _rewrite(run, tmp_path, lambda s: {k: v[:2].contiguous() for k, v in s.items()})
    message = _one_line_refusal(weights)
    assert "'image_anchors' has shape [2, 32], expected [4, 32]" in message, message


@pytest.mark.parametrize("case", sorted(OLD_KEYS))
def test_a_weights_file_with_the_former_tensor_names_loads(runs, case, tmp_path):
    """The file name and tensor names are those run dirs have held all along; a file written here with those names
    (random values of the run's shapes) loads into the method and gives back exactly those values."""
    _, run = runs(case)
    weights = weights_of(run)
    assert weights.name == OLD_FILES.get(case, "weights.safetensors")
    shapes = {k: v.shape for k, v in load_file(str(weights)).items()}
    assert set(shapes) == OLD_KEYS[case]
    g = torch.Generator().manual_seed(1)
    written = {k: torch.randn(shapes[k], generator=g) for k in sorted(OLD_KEYS[case])}
    out = tmp_path / "old"
    out.mkdir()
    meta = json.loads((run / "method.json").read_text())
    (out / "method.json").write_text(json.dumps({"method": meta["method"], "config": meta["config"]}))
    save_file(written, str(out / weights.name))
    state = load_aligner(out).state_dict()
    assert set(state) == set(written) and all(torch.equal(state[k], written[k]) for k in written)


class NoBiasHeads(ContrastiveHeads):
    """A contrastive method in a few lines: its head, and everything else (InfoNCE, STRUCTURE, centring) shared."""

    Config = LinearConfig

    def make_head(self, din: int) -> nn.Module:
        return nn.Linear(din, self.config.dim, bias=False)


@pytest.fixture
def nobias_registered():
    METHODS.register("nobias-test", NoBiasHeads)
    yield
    METHODS.unregister("nobias-test")


def test_a_contrastive_method_is_its_head_on_the_shared_base(world_features, nobias_registered, tmp_path):
    config = LinearConfig(dim=8, lr_finder=0, structure_weight=1.0, structure_warmup_steps=2, center=True)
    result = fit(NoBiasHeads, config, RUN, world_pairs(world_features, False))
    heads = result.aligner
    assert type(heads.img) is nn.Linear and heads.img.bias is None and heads.txt.weight.shape == (8, 32)
    assert set(heads.state_dict()) == {"img.weight", "txt.weight", "center_img", "center_txt"}
    assert heads.center_img.abs().sum() > 0  # the shared centring ran
    assert all(h["structure"] > 0 for h in result.history)  # the shared regulariser ran
    heads.save(tmp_path / "run")
    back, saved = load_aligner(tmp_path / "run"), heads.state_dict()
    assert type(back) is NoBiasHeads and all(torch.equal(v, saved[k]) for k, v in back.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_load_on_cuda_moves_every_tensor_and_agrees_with_cpu(runs, case):
    _, run = runs(case)
    cpu, gpu = load_aligner(run), load_aligner(run, device="cuda")
    assert all(t.is_cuda for t in gpu.state_dict().values())
    image, text = random_rows()
    on = (
        ImageRows(image.cls.cuda(), image.patches.cuda()),
        TextRows(text.pooled.cuda(), text.tokens.cuda(), text.length.cuda()),
    )
    want, got = outputs(cpu, image, text), outputs(gpu, *on)
    for key, value in want.items():
        if value is not None:
            torch.testing.assert_close(got[key].cpu(), value, rtol=1e-4, atol=1e-4)
