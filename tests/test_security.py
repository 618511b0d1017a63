"""No code from data, no write outside the named folders, no option that runs forever (docs/guarantees.md, "Security").

Each test plays a file a user may have downloaded or an attacker planted (a checkpoint, a recipe, a model folder, a
link at a temporary's name) or a value from a bad day, and checks the one-line refusal and that nothing ran or was
written where it should not be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipe_align.extract.errors import PipeError
from pipe_align.pipelines.cli import main
from tests.helpers import one_line_error
from tests.replicas import replica
from tests.tiny_models import make_tiny_dinov2

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pipelines" / "recipes" / "pal-paper.toml"
FAST = [
    "--anchors",
    "8",
    "--no-use-cls",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--val-fraction",
    "0.25",
    "--no-progress",
]


def align_args(world_features: Path, out: Path, *extra: str) -> list[str]:
    return ["align", "--shards", str(world_features / "world" / "train"), "--out", str(out), *FAST, *extra]


# ------------------------------------------------------------------------------------- 1. no code from a checkpoint


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): what a hostile pickle does with any callable it names."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_hostile_checkpoint_is_refused_without_running_it(tmp_path, world_features, capsys, interrupt_at):
    out = tmp_path / "run"
    interrupt_at(1)
    assert main(align_args(world_features, out)) == 130  # a real unfinished run: run.json and checkpoint.pt
    interrupt_at(None)
    marker = tmp_path / "pwned"
    key = torch.load(out / "checkpoint.pt", weights_only=True)["key"]  # the right key: only the payload is hostile
    torch.save({"params": [_CreatesMarker(marker)], "key": key}, out / "checkpoint.pt")
    capsys.readouterr()
    assert main([*align_args(world_features, out), "--resume"]) == 2
    one_line_error(capsys, 2, "checkpoint.pt", "cannot be read as a checkpoint")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- 2. names are names


def recipe_with(tmp_path: Path, old: str, new: str) -> Path:
    text = SHIPPED.read_text()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("[methods.pal]", '[methods."../../../x"]', "methods.'../../../x'"),
        ("[methods.pal]", '[methods."/abs/path"]', "methods.'/abs/path'"),
        ('name = "pal-paper"', 'name = "x/../../y"', "recipe.name"),
        ('split = "val"\nprotocol = "pal"', 'split = "../../../z"\nprotocol = "pal"', "eval[4].split"),
        ('split = "train" ', 'split = ".." ', "train.split"),
        ("[datasets.stl10]", '[datasets."a/b"]', "datasets.'a/b'"),
        ('reader = "coco"', 'reader = "../coco"', "datasets.coco.reader"),
    ],
)
def test_recipe_names_are_one_path_component(tmp_path, capsys, old, new, key):
    path = recipe_with(tmp_path, old, new)
    out = tmp_path / "work" / "out"
    assert main(["reproduce", str(path), "--out", str(out), "--data", str(tmp_path / "data")]) == 2
    one_line_error(capsys, 2, f"{path}: {key}: ", "is not a name", "allowed: letters, digits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # nothing written anywhere


def test_split_options_are_names(tmp_path, tiny_dinov2, world_features, capsys):
    feats = tmp_path / "a" / "features"
    assert (
        main(
            [
                "extract",
                "--encoder",
                f"hf:{tiny_dinov2}",
                "--dataset",
                "world",
                "--split",
                "../../x",
                "--features",
                str(feats),
                "-o",
                "size=4",
                "--no-progress",
            ]
        )
        == 2
    )
    one_line_error(capsys, 2, "--split: '../../x' is not a name")
    assert not (tmp_path / "a").exists() and not (tmp_path / "x").exists()
    assert (
        main(
            [
                "eval",
                "classification",
                "--dataset",
                "world",
                "--split",
                "../val",
                "--features",
                str(world_features),
                "--run",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    one_line_error(capsys, 2, "--split: '../val' is not a name")


# ------------------------------------------------------------------------------- 3. values of their type and range


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("methods.pal.anchors=100000000000", "anchors=100000000000 is out of range; allowed: from 1 to 65536"),
        ("methods.pal.anchors=true", "anchors=True is not an integer; allowed: an integer from 1 to 65536"),
        ("methods.pal.lr_finder=100000000", "lr_finder=100000000 is out of range; allowed: from 0 to 10000"),
        ("train.epochs=1e400", "train.epochs: inf is not an integer; allowed: an integer from 1 to 100000"),
        (
            "train.epochs=9223372036854775807",
            "train.epochs: 9223372036854775807 is out of range; allowed: from 1 to 100000",
        ),
        ('train.epochs="three"', "train.epochs: 'three' is not an integer; allowed: an integer from 1 to 100000"),
        ("train.epochs=2.5", "train.epochs: 2.5 is not an integer"),
        ("train.batch_size=true", "train.batch_size: True is not an integer"),
        ("train.val_fraction=true", "train.val_fraction: True is not a finite number"),
        ("methods.pal.run.patience=1e9", "methods.pal.run.patience: 1000000000.0 is not an integer"),
    ],
)
def test_recipe_values_have_their_type_and_range(tmp_path, capsys, setting, expected):
    out = tmp_path / "out"
    assert main(["reproduce", "pal-paper", "--out", str(out), "--data", str(tmp_path), "--set", setting]) == 2
    one_line_error(capsys, 2, "pal-paper.toml: ", expected)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--anchors", "100000000000"], "anchors=100000000000 is out of range; allowed: from 1 to 65536"),
        (["--lr-finder", "100000000"], "lr_finder=100000000 is out of range; allowed: from 0 to 10000"),
        (["--epochs", "1000000"], "--epochs 1000000 is out of range; allowed: from 1 to 100000"),
        (["--patience", "1000000"], "--patience 1000000 is out of range; allowed: from 0 to 100000"),
        (["--batch-size", "100000000000"], "--batch-size 100000000000 is out of range; allowed: from 2 to 16777216"),
        (["-p", "anchors=true"], "anchors=True is not an integer"),
        (["-p", "anchors=2.5"], "anchors=2.5 is not an integer"),
        (["-p", 'tau="x"'], "tau='x' is not a finite number"),
        (["--method", "sotalign", "--n-iter", "100000000"], "n_iter=100000000 is out of range; allowed: up to 1048576"),
    ],
)
def test_align_options_are_bounded(tmp_path, capsys, flags, expected):
    """Checked before the stores are even looked for (--shards does not exist)."""
    assert main(["align", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "run"), *flags]) == 2
    one_line_error(capsys, 2, expected)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ 4. every stage's needs known up front


PAL_SEG = """
[encoders]
image = "hf:{image}"
text = "hf:{text}"
[datasets]
world = {{ options = {{ size = 16 }} }}
voc = {{ root = "{voc}"{extract} }}
[train]
dataset = "world"
split = "train"
[[eval]]
task = "segmentation"
dataset = "voc"
split = "val"
protocol = "{protocol}"
[methods.procrustes]
"""


def pal_seg_recipe(tmp_path: Path, image: str, text: str, protocol: str = "pal", extract: str = "") -> Path:
    voc = replica("voc", tmp_path / "VOCdevkit")
    path = tmp_path / "seg.toml"
    path.write_text(PAL_SEG.format(image=image, text=text, voc=voc, protocol=protocol, extract=extract))
    return path


def test_pal_segmentation_eval_gets_its_prompts_extracted(tmp_path, tiny_dinov2, tiny_bert):
    """No `extract = { prompts = "pal" }` in the recipe: the eval's pal protocol is what says which prompts it reads,
    so reproduce extracts the PAL authors' prompt store itself (before, it trained, then stopped at the eval asking for
    a manual `pipe extract --prompts pal`)."""
    recipe = pal_seg_recipe(tmp_path, tiny_dinov2, tiny_bert)
    out = tmp_path / "out"
    assert main(["reproduce", str(recipe), "--out", str(out), "--no-progress", "--no-figures"]) == 0
    stores = sorted(p.name for p in (out / "features" / "voc" / "val").iterdir())
    assert len(stores) == 2 and stores[1].endswith(".pal.prompts.zarr"), stores
    attrs = json.loads((out / "features" / "voc" / "val" / stores[1] / "zarr.json").read_text())["attributes"]
    assert attrs["prompts"] == "pal" and "dining table" in attrs["prompt_names"]  # the authors' spelling
    result = json.loads((out / "runs" / "procrustes" / "eval" / "segmentation-voc-val-pal.json").read_text())
    assert 0.0 <= result["fg_mIoU"] <= 1.0


def test_a_prompt_setting_the_eval_cannot_use_is_refused_up_front(tmp_path, tiny_dinov2, tiny_bert, capsys):
    recipe = pal_seg_recipe(
        tmp_path, tiny_dinov2, tiny_bert, protocol="standard", extract=', extract = { prompts = "pal" }'
    )
    out = tmp_path / "out"
    assert main(["reproduce", str(recipe), "--out", str(out), "--no-progress", "--no-figures"]) == 2
    one_line_error(
        capsys,
        2,
        f"{recipe}: datasets.voc.extract.prompts: 'pal', but segmentation voc/val [standard] "
        "scores with the standard prompts",
    )
    assert not (out / "features").exists() and not (out / "runs").exists()


# ----------------------------------------------------------------------------- 5. temporaries created exclusively


def test_planted_links_at_temporary_names_are_not_followed(tmp_path, world_features, capsys):
    """A link at the old fixed temporary name (`<file>.tmp`) of run.json, checkpoint.pt and an eval result points at
    a victim outside the run; every write goes through a fresh exclusive temporary instead, so the victims stay."""
    victims = {name: tmp_path / f"victim-{name}" for name in ("run.json", "checkpoint.pt", "eval")}
    for v in victims.values():
        v.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("run.json", "checkpoint.pt"):
        (out / f"{name}.tmp").symlink_to(victims[name])
    assert main(align_args(world_features, out)) == 0
    assert json.loads((out / "run.json").read_text())["complete"] is True
    (out / "eval").mkdir()
    (out / "eval" / "classification-world-val.json.tmp").symlink_to(victims["eval"])
    assert (
        main(
            [
                "eval",
                "classification",
                "--dataset",
                "world",
                "--split",
                "val",
                "--features",
                str(world_features),
                "--run",
                str(out),
                "-o",
                "size=8",
                "--no-figures",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads((out / "eval" / "classification-world-val.json").read_text())["acc1"] >= 0
    assert {n: v.read_text() for n, v in victims.items()} == dict.fromkeys(victims, "precious")
    left = sorted(p.name for p in out.rglob("*.tmp") if not p.is_symlink())
    assert left == [], left


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path):
    from pipe_align.extract.files import write_text

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "table.json").symlink_to(victim)
    write_text(tmp_path / "table.json", "{}")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "table.json").is_symlink() and (tmp_path / "table.json").read_text() == "{}"
    assert oct((tmp_path / "table.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------- 6. no custom code from a folder


def test_a_model_folder_that_needs_custom_code_is_refused(tmp_path, capsys, monkeypatch):
    """transformers asks on a terminal whether to run a folder's own code; a user answering y ran it. pipe passes
    trust_remote_code=False: no question, no code, one line naming the folder."""
    import builtins

    folder = tmp_path / "evil-model"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "pipe-evil-model",
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
            }
        )
    )
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'pipe-evil-model'\n"
    )
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    feats = tmp_path / "features"
    assert (
        main(
            [
                "extract",
                "--encoder",
                f"hf:{folder}",
                "--dataset",
                "world",
                "--split",
                "train",
                "--features",
                str(feats),
                "-o",
                "size=4",
                "--no-progress",
            ]
        )
        == 2
    )
    one_line_error(capsys, 2, str(folder.resolve()), "needs the model's own Python code", "never runs")
    assert not marker.exists() and asked == []


# ---------------------------------------------------------------------- 7. the weights transformers loads are hashed


def test_swapped_single_file_beside_a_stale_index_changes_the_identity(tmp_path, capsys):
    """transformers 5 loads `model.safetensors` when it exists, whatever index lies beside it (its rule, checked here
    on the model it returns); the identity must follow that file, so a swap is refused by the store check."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from pipe_align.extract.encoders.local import folder_sha256

    folder = make_tiny_dinov2(tmp_path / "m")
    shard = "model-00001-of-00001.safetensors"
    shutil.copy(folder / "model.safetensors", folder / shard)  # the stale index names an old copy of the weights
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(weights, shard)})
    )
    before = folder_sha256(folder)
    args = [
        "extract",
        "--encoder",
        f"hf:{folder}",
        "--dataset",
        "world",
        "--split",
        "train",
        "--features",
        str(tmp_path / "features"),
        "-o",
        "size=4",
        "--no-progress",
    ]
    assert main(args) == 0
    swapped = {k: v + 1.0 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(swapped, str(tmp_path / "new.safetensors"), metadata={"format": "pt"})
    os.replace(tmp_path / "new.safetensors", folder / "model.safetensors")
    loaded = AutoModel.from_pretrained(str(folder), trust_remote_code=False).state_dict()
    name = next(k for k in swapped if swapped[k].is_floating_point() and k in loaded)
    assert torch.equal(loaded[name], swapped[name])  # transformers loaded the single file, not the index's shard
    assert folder_sha256(folder) != before
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, 2, "differs in encoder")


# -------------------------------------------------------------------------- 8. a full disk while checkpointing


def test_file_size_limit_while_checkpointing_is_one_line_and_keeps_the_last(tmp_path, world_features, interrupt_at):
    out = tmp_path / "run"
    interrupt_at(1)
    assert main(align_args(world_features, out)) == 130
    interrupt_at(None)
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    assert len((out / "run.json").read_bytes()) < len(before)  # the limit below lets run.json through
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before)}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        from pipe_align.pipelines.cli import main
        sys.exit(main({[*align_args(world_features, out), "--resume"]!r}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0, err
    assert err.startswith(f"error: {ckpt}: cannot be written: ") and "(EFBIG)" in err and "previous file is kept" in err
    assert ckpt.read_bytes() == before
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_disk_full_while_writing_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    from pipe_align.extract import files

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(
        PipeError,
        match=r"checkpoint\.pt: cannot be written: No space left on device \(ENOSPC\); "
        "the previous file is kept; free space",
    ):
        files.write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
