"""The paper's claims put to the test: the pooled control, the collapse diagnostic, unseen classes, falsification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipe_align.align.base import ImageRows, TextRows
from pipe_align.align.loop import RunConfig
from pipe_align.align.methods import load_aligner
from pipe_align.align.pal import PAL, PALConfig
from pipe_align.align.run import AlignConfig, run_align
from pipe_align.extract.errors import PipeError

FAST = (("anchors", 16), ("tau_p", 0.1), ("use_cls", False))
RUN = RunConfig(batch_size=8, epochs=3, val_fraction=0.25)


def test_pooled_control_is_the_anchor_similarity_of_the_mean_token():
    """profile=pooled: one representation per sample (the mean of its valid tokens), its cosine to each anchor."""
    g = torch.Generator().manual_seed(0)
    pal = PAL(PALConfig(anchors=6, tau_p=0.05, use_cls=True, profile="pooled"), image_dim=5, text_dim=4)
    cls, patches = torch.randn(3, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    tokens, length = torch.randn(2, 9, 4, generator=g), torch.tensor([9, 3])
    img = pal.image_profiles(ImageRows(cls=cls, patches=patches))
    txt = pal.text_profiles(TextRows(pooled=torch.zeros(2, 4), tokens=tokens, length=length))
    cos = torch.nn.functional.cosine_similarity
    for n in range(3):
        mean = torch.cat([cls[n : n + 1], patches[n]]).mean(0)
        want = torch.stack([cos(mean, a, dim=0) for a in pal.image_anchors])
        assert torch.allclose(img[n], want, atol=1e-5)
    for n in range(2):
        mean = tokens[n, : int(length[n])].mean(0)  # padding never counts
        want = torch.stack([cos(mean, a, dim=0) for a in pal.text_anchors])
        assert torch.allclose(txt[n], want, atol=1e-5)
    full = PAL(PALConfig(anchors=6, tau_p=0.05, use_cls=True), image_dim=5, text_dim=4)
    assert not torch.allclose(full.image_profiles(ImageRows(cls=cls, patches=patches)), img, atol=1e-3)
    with pytest.raises(PipeError, match="profile"):
        PALConfig(profile="mean")


def test_pooled_control_trains_through_the_one_loop(tmp_path, world_features):
    params = (*FAST, ("profile", "pooled"))
    out = run_align(
        AlignConfig(
            shards=str(world_features / "world" / "train"), out=str(tmp_path / "pooled"), params=params, run=RUN
        ),
        progress=False,
    ).path
    meta = json.loads((out / "run.json").read_text())
    assert meta["complete"] and len(meta["history"]) == 3
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"]
    pal = load_aligner(out)
    assert pal.config.profile == "pooled"


def test_within_sample_variance_against_numpy_and_the_shuffled_control():
    from pipe_align.evaluate.collapse import shuffled, within_variance

    rng = np.random.default_rng(0)
    sims = torch.from_numpy(rng.standard_normal((5, 7, 3)))
    length = [7, 1, 4, 6, 2]
    mask = torch.arange(7)[None, :] < torch.tensor(length)[:, None]
    got = within_variance(sims, mask).numpy()
    want = [np.var(sims[n, : length[n]].numpy(), axis=0).mean() for n in range(5)]  # population variance per anchor
    assert np.allclose(got, want)
    # tokens constant within each sample: no within-sample variance, however much samples differ
    const = torch.from_numpy(rng.standard_normal((5, 1, 3))).expand(5, 7, 3).contiguous()
    assert torch.allclose(within_variance(const, mask), torch.zeros(5, dtype=const.dtype))
    mixed = shuffled(const, mask, torch.Generator().manual_seed(0))
    assert sorted(mixed[mask].flatten().tolist()) == sorted(const[mask].flatten().tolist())  # same tokens, regrouped
    assert (mixed[~mask] == const[~mask]).all() and within_variance(mixed, mask).mean() > 0.1


def test_eval_collapse_and_its_figure(tmp_path, world_features):
    from pipe_align.pipelines.cli import main

    out = run_align(
        AlignConfig(shards=str(world_features / "world" / "train"), out=str(tmp_path / "pal"), params=FAST, run=RUN),
        progress=False,
    ).path
    assert (
        main(
            [
                "eval",
                "collapse",
                "--dataset",
                "world",
                "--split",
                "val",
                "--features",
                str(world_features),
                "--run",
                str(out),
                "--device",
                "cpu",
                "-o",
                "size=8",
            ]
        )
        == 0
    )
    res = json.loads((out / "eval" / "collapse-world-val.json").read_text())
    for side in ("image", "text"):
        assert res[f"{side}_within_var"] > 0 and res[f"{side}_shuffled_var"] > 0 and res[f"{side}_untrained_var"] > 0
        assert res[f"{side}_within_over_shuffled"] == pytest.approx(
            res[f"{side}_within_var"] / res[f"{side}_shuffled_var"]
        )
    assert res["image_samples"] == 8 and (out / "eval" / "figures" / "collapse-world-val-variance.png").is_file()


def test_world_unseen_option_leaves_those_classes_out_of_training():
    from pipe_align.extract.datasets import World

    full, part = World(None, "train", size=40), World(None, "train", size=40, unseen="moon,cup")
    shown = {r.id: {o.cls for o in s.objects} for r, s in zip(full.images(), full.scenes(), strict=True)}
    assert [r.id for r in part.images()] == [i for i, cls in shown.items() if not cls & {"moon", "cup"}]
    assert all("moon" not in c.text.lower() and "cup" not in c.text.lower() for c in part.captions())
    same = {c.id: c.text for c in full.captions()}
    assert all(same[c.id] == c.text for c in part.captions())  # kept items keep their ids and captions
    assert World.seen_classes({"unseen": "moon,cup"}) == [c for c in full.classes[1:] if c not in ("moon", "cup")]
    with pytest.raises(PipeError, match="option unseen names 'mooon'"):
        World(None, "train", unseen="mooon")


def test_seen_and_unseen_accuracy_are_mean_recalls_of_each_group():
    from pipe_align.evaluate.classification import seen_unseen

    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0])
    out = seen_unseen(pred, y, ["a", "b", "c", "d"], {"a", "b"})
    # recalls by hand: a 1/2, b 2/2, c 2/3, d 0/1
    assert out["seen_acc"] == pytest.approx((0.5 + 1.0) / 2) and out["unseen_acc"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["unseen_names"] == ["c", "d"] and seen_unseen(pred, y, ["a", "b", "c", "d"], {"a", "b", "c", "d"}) == {}


def test_classification_reports_seen_and_unseen_for_a_run_trained_on_a_subset(tmp_path, tiny_dinov2, tiny_bert):
    from pipe_align.extract.runner import ExtractConfig, run_extract
    from pipe_align.pipelines.cli import main

    feats = tmp_path / "f"
    for split, text, opts in (
        ("train", "captions", (("size", 24), ("unseen", "moon,cup"))),
        ("val", "prompts", (("size", 16),)),
    ):
        for enc, t in ((f"hf:{tiny_dinov2}", "auto"), (f"hf:{tiny_bert}", text)):
            run_extract(
                ExtractConfig(
                    encoder=enc, dataset="world", split=split, features=str(feats), text=t, options=opts, batch_size=8
                ),
                progress=False,
            )
    run = tmp_path / "run"
    assert (
        main(
            [
                "align",
                "--method",
                "procrustes",
                "--shards",
                str(feats / "world" / "train"),
                "--out",
                str(run),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
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
                str(feats),
                "--run",
                str(run),
                "--device",
                "cpu",
                "-o",
                "size=16",
            ]
        )
        == 0
    )
    res = json.loads((run / "eval" / "classification-world-val.json").read_text())
    labels = {json.dumps(n) for n in res["unseen_names"]}
    assert labels <= {'"moon"', '"cup"'} and 0 <= res["unseen_acc"] <= 1 and 0 <= res["seen_acc"] <= 1


def test_spearman_and_ranks_against_independent_definitions():
    from pipe_align.evaluate.falsify import rank_of_best_positive, spearman

    # Spearman by its textbook formula on distinct values: 1 - 6 sum d^2 / (n (n^2 - 1))
    a, b = np.array([3.0, 1.0, 4.0, 1.5, 9.0, 2.6]), np.array([2.0, 7.0, 1.0, 8.0, 2.5, 3.0])
    ra, rb = a.argsort().argsort() + 1, b.argsort().argsort() + 1
    n = len(a)
    assert spearman(a, b) == pytest.approx(1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1)))
    assert spearman(np.array([1, 2, 2, 3.0]), np.array([1, 2, 2, 3.0])) == pytest.approx(1.0)  # ties
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 4, generator=g), torch.randn(12, 4, generator=g)
    links = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 1])
    got = rank_of_best_positive(img, txt, links)
    for i in range(5):
        order = sorted(range(12), key=lambda j: -float(img[i] @ txt[j]))
        assert got[i] == 1 + min(order.index(j) for j in range(12) if links[j] == i)


def test_falsification_command_on_the_world(tmp_path, tiny_dinov2, tiny_bert):
    from pipe_align.extract.runner import ExtractConfig, run_extract
    from pipe_align.pipelines.cli import main

    feats = tmp_path / "f"
    for split, size, texts in (("train", 16, ("captions",)), ("test", 8, ("captions", "phrases"))):
        for enc, t in [(f"hf:{tiny_dinov2}", "auto")] + [(f"hf:{tiny_bert}", x) for x in texts]:
            run_extract(
                ExtractConfig(
                    encoder=enc,
                    dataset="world",
                    split=split,
                    features=str(feats),
                    text=t,
                    options=(("size", size),),
                    batch_size=8,
                ),
                progress=False,
            )
    runs = {}
    for method, extra in (("pal", ["--epochs", "1", "--anchors", "8", "--lr-finder", "0"]), ("procrustes", [])):
        runs[method] = tmp_path / method
        assert (
            main(
                [
                    "align",
                    "--method",
                    method,
                    "--shards",
                    str(feats / "world" / "train"),
                    "--out",
                    str(runs[method]),
                    "--device",
                    "cpu",
                    "--no-progress",
                    *extra,
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "claims",
                "--pal",
                str(runs["pal"]),
                "--baseline",
                str(runs["procrustes"]),
                "--dataset",
                "world",
                "--split",
                "test",
                "--features",
                str(feats),
                "-o",
                "size=8",
            ]
        )
        == 0
    )
    res = json.loads((runs["pal"] / "eval" / "claims-world-test.json").read_text())
    assert res["images"] == 8 and res["best_baseline"].startswith("procrustes") and isinstance(res["holds"], bool)
    assert res["images_grounding_fails"] + res["images_grounding_works"] == 8 and 0 < res["spearman_p"] <= 1


def _fake_run(path, method, profile, results):
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"method": method, "config": {"profile": profile} if profile else {}}))
    (path / "eval").mkdir()
    for i, r in enumerate(results):
        where = {"dataset": "world", "split": "val", "method": method}
        (path / "eval" / f"r{i}.json").write_text(json.dumps(r | where))
    return path


def test_report_states_each_claim_with_its_numbers_and_verdict(tmp_path):
    from pipe_align.evaluate.report import write_report

    g = {"task": "grounding", "pointing_acc": 0.5, "chance": 0.1, "phrases": 100}  # 2 s.e. = 0.06: 0.5 > 0.16
    full = _fake_run(
        tmp_path / "pal",
        "pal",
        "tokens",
        [
            g,
            {
                "task": "collapse",
                "image_within_over_shuffled": 0.05,
                "text_within_over_shuffled": 0.4,
                "image_within_over_untrained": 0.5,
                "text_within_over_untrained": 1.1,
            },
            {
                "task": "classification",
                "acc1": 0.5,
                "balanced_acc": 0.5,
                "classes": 10,
                "seen_acc": 0.7,
                "unseen_acc": 0.05,
                "unseen_names": ["moon"],
            },
        ],
    )
    pooled = _fake_run(tmp_path / "pooled", "pal", "pooled", [g | {"pointing_acc": 0.12}])  # 0.12 < 0.16
    _, _, text = write_report([full, pooled], tmp_path / "report.md")
    lines = [x for x in text.splitlines() if x.startswith("- **")]
    assert any("Token correspondence** (pal," in x and "50.0%" in x and x.endswith(": holds.") for x in lines)
    assert any("Token correspondence** (pooled," in x and "12.0%" in x and x.endswith("does not hold.") for x in lines)
    assert any(
        "Per-token profiles matter" in x and "full 50.0% vs pooled 12.0%" in x and x.endswith(": holds.") for x in lines
    )
    assert any("No collapse" in x and "0.05 (image)" in x and "does not hold (figure: " in x for x in lines)
    assert any("unseen 5.0% (moon) vs chance 10.0%" in x and x.endswith("does not hold.") for x in lines)
    assert "## Claims of the PAL paper" in (tmp_path / "report.md").read_text()


def test_a_difference_within_sampling_error_is_no_verdict_for_the_claim(tmp_path):
    """Full 37.3% vs pooled 36.6% pointing accuracy on 644 phrases, or unseen accuracy 10.2% against a chance of
    8.3% on 30 unseen images, are within two binomial standard errors (sqrt(p(1-p)/n)): "does not hold"."""
    from pipe_align.evaluate.report import write_report

    g = {"task": "grounding", "pointing_acc": 0.373, "chance": 0.118, "phrases": 644}
    full = _fake_run(
        tmp_path / "pal",
        "pal",
        "tokens",
        [
            g,
            {
                "task": "classification",
                "acc1": 0.5,
                "balanced_acc": 0.5,
                "classes": 12,
                "seen_acc": 0.7,
                "unseen_acc": 0.102,
                "unseen_images": 30,
                "unseen_names": ["moon"],
            },
        ],
    )
    pooled = _fake_run(tmp_path / "pooled", "pal", "pooled", [g | {"pointing_acc": 0.366}])
    _, _, text = write_report([full, pooled], tmp_path / "report.md")
    lines = [x for x in text.splitlines() if x.startswith("- **")]
    se = 2 * (0.373 * 0.627 / 644 + 0.366 * 0.634 / 644) ** 0.5  # 5.4 points: 0.7 is inside it
    assert any(
        "Per-token profiles matter" in x and f"2 s.e. {100 * se:.1f}" in x and x.endswith("does not hold.")
        for x in lines
    ), lines
    bar = 1 / 12 + 2 * ((1 / 12) * (11 / 12) / 30) ** 0.5  # 18.4%
    assert any("unseen 10.2%" in x and f"= {100 * bar:.1f}%" in x and x.endswith("does not hold.") for x in lines)
