"""PAL's presets (issue 15): per-bank clipping, the LR finder, the authors' schedule, the preset in run.json, and the
user's options winning over any preset. Each definition is checked against a few lines written here independently
(from the PAL authors' code as described in align/lr_finder.py and align/loop.py), or against torch's own scheduler."""

import json
import math

import pytest
import torch

from pipe_align.align import loop
from pipe_align.align.loop import RunConfig, clip_gradients, lr_at
from pipe_align.align.lr_finder import find_lr, pick_lr
from pipe_align.align.pal import PAL
from pipe_align.align.pal_presets import K_GRID
from pipe_align.pipelines.cli import main


def shards(feats):
    return str(feats / "world" / "train")


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.zeros(4, 3, requires_grad=True),
        torch.zeros(5, requires_grad=True),
        torch.zeros(2, 2, requires_grad=True),
    ]
    for p, scale in zip(params, (3.0, 0.1, 2.0)):
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


# -- per-bank clipping -------------------------------------------------------------------------------------------------
def test_per_group_clipping_is_each_groups_norm_clipped_on_its_own():
    params = _grads()
    want = [p.grad.clone() for p in params]
    groups_idx = [[0], [1, 2]]
    for idx in groups_idx:  # the definition: each group's own norm, coefficient clip / (norm + 1e-6) where below 1
        norm = math.sqrt(sum(float((want[i] ** 2).sum()) for i in idx))
        coef = 1.0 / (norm + 1e-6)
        if coef < 1:
            for i in idx:
                want[i] = want[i] * coef
    before = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    norm = clip_gradients([[params[i] for i in idx] for idx in groups_idx], 1.0, "per_group")
    assert norm == pytest.approx(before, rel=1e-6)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)
    # global clipping of the same gradients is another result (so the test above can tell the two apart)
    glob = _grads()
    clip_gradients([[glob[i] for i in idx] for idx in groups_idx], 1.0, "global")
    assert not torch.allclose(glob[0].grad, params[0].grad)
    total = math.sqrt(sum(float((p.grad**2).sum()) for p in glob))
    assert total == pytest.approx(1.0, rel=1e-5)


def test_pal_clips_each_anchor_bank(tmp_path, world_features, monkeypatch):
    seen = []
    real = loop.clip_gradients

    def spy(groups, clip, mode="global"):
        seen.append(([[tuple(p.shape) for p in g] for g in groups], clip, mode))
        return real(groups, clip, mode)

    monkeypatch.setattr(loop, "clip_gradients", spy)
    assert (
        main(
            [
                "align",
                "--shards",
                shards(world_features),
                "--out",
                str(tmp_path / "r"),
                "--preset",
                "paper",
                "--anchors",
                "8",
                "--lr",
                "0.01",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    assert seen and all(s == ([[(8, 32)], [(8, 32)]], 1.0, "per_group") for s in seen), seen[:2]


# -- the LR finder -----------------------------------------------------------------------------------------------------
def test_lr_finder_pick_on_a_hand_computed_curve():
    lrs = [1e-7 * 10 ** (i / 2) for i in range(10)]  # log10 spacing 0.5
    losses = [5, 5, 5, 5, 5, 1, 1, 1, 1, 1]
    # smoothed (0.05 previous + 0.95 new): 5, 5, 5, 5, 5, 1.2, 1.01, 1.0005, 1.000025, 1.00000125; the minimum is the
    # last point (index 9), so indices 1..7 are candidates; central slopes (s[i+1] - s[i-1]) / 1.0 are 0, 0, 0, -3.8
    # (i = 4), -3.99 (i = 5), -0.1995, -0.0095: steepest at 5, rate lrs[5] / 5
    lr, steep = pick_lr(lrs, losses, start=1e-7)
    assert steep == 5 and lr == pytest.approx(lrs[5] / 5)
    # never below 10x the start
    assert pick_lr(lrs, [5, 1, 1, 1, 1, 1, 1, 1, 1, 1], start=1e-7)[0] == pytest.approx(1e-6)
    assert pick_lr(lrs[:1], losses[:1], start=1e-7) == (None, None)


def _reference_pick(lrs, losses, start):
    """The authors' pick written out in plain Python: smoothing, slope against log10(lr), steepest before the min."""
    s = [losses[0]]
    for v in losses[1:]:
        s.append(0.05 * s[-1] + 0.95 * v)
    x = [math.log10(v) for v in lrs]
    n = len(s)
    slope = [(s[1] - s[0]) / (x[1] - x[0])]
    for i in range(1, n - 1):  # numpy.gradient's second-order interior formula for uneven spacing
        h0, h1 = x[i] - x[i - 1], x[i + 1] - x[i]
        slope.append((h0**2 * s[i + 1] - h1**2 * s[i - 1] + (h1**2 - h0**2) * s[i]) / (h0 * h1 * (h0 + h1)))
    slope.append((s[-1] - s[-2]) / (x[-1] - x[-2]))
    low = min(range(n), key=lambda i: (s[i], i))
    cand = list(range(1, min(low, n - 1)))
    steep = min(cand, key=lambda i: (slope[i], i)) if cand else max(0, low - 1)
    return max(lrs[steep] / 5, start * 10), steep


@pytest.mark.parametrize("seed", range(5))
def test_lr_finder_pick_equals_a_plain_definition_on_noisy_curves(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    lrs = [1e-7 * 1.5**i for i in range(n)]
    base = [6 - 4 / (1 + math.exp(-(i - 20) / 3)) for i in range(n)]
    losses = [b + float(e) for b, e in zip(base, torch.rand(n, generator=g) * 0.3)]
    lr, steep = pick_lr(lrs, losses, start=1e-7)
    want_lr, want_steep = _reference_pick(lrs, losses, 1e-7)
    assert steep == want_steep and lr == pytest.approx(want_lr)


def test_lr_finder_walks_geometric_rates_stops_on_divergence_and_restores_parameters():
    w = torch.tensor([0.5, -0.2], requires_grad=True)
    start = w.detach().clone()
    rec = find_lr(
        [w],
        lambda _: ((w - 1) ** 2).sum() + 0.01,
        iter(range(1000)),
        iters=100,
        start=1e-4,
        end=1e4,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    assert torch.equal(w.detach(), start)
    mult = (1e4 / 1e-4) ** (1 / 100)
    assert all(lr == pytest.approx(1e-4 * mult**i) for i, lr in enumerate(rec["lrs"]))
    assert rec["stopped"] == "diverged" and rec["iters"] < 100
    last, lowest = rec["losses"][-1], min(rec["losses"][:-1])
    assert last > 5 * lowest and all(v <= 5 * min(rec["losses"][: i + 1]) for i, v in enumerate(rec["losses"][:-1]))
    assert rec["lr"] == pick_lr(rec["lrs"], rec["losses"], 1e-4)[0]


# -- the schedule ------------------------------------------------------------------------------------------------------
def test_cosine_without_warmup_values():
    # hand values of base * (1 + cos(pi t / T)) / 2 for T = 10, no warm-up: the first step takes the full rate
    want = {0: 1.0, 5: 0.5, 10: 0.0, 2: (1 + math.cos(math.pi / 5)) / 2}
    for step, v in want.items():
        assert lr_at(step, 10, 0, 1.0, "cosine") == pytest.approx(v, abs=1e-12)


def test_cosine_cycle_is_torchs_cosine_annealing_stepped_per_batch():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    for step in range(40):  # past several half periods: the rate comes back up, as theirs does over 1000 epochs
        assert lr_at(step, 10, 0, 0.3, "cosine_cycle", period=7) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()


def test_paper_schedule_period_is_50_epochs_of_floor_pairs_over_batch(tmp_path, world_features):
    # 18 training pairs, batch 8: T_max = cycle_epochs x max(1, 18 // 8) = 2 steps here; 3 steps per epoch (8, 8, 2)
    out = tmp_path / "r"
    assert (
        main(
            [
                "align",
                "--shards",
                shards(world_features),
                "--out",
                str(out),
                "--preset",
                "paper",
                "--anchors",
                "8",
                "--lr",
                "0.1",
                "--cycle-epochs",
                "1",
                "--epochs",
                "3",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((out / "run.json").read_text())
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    rates = []
    for _ in range(9):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [h["lr"] for h in meta["history"]] == pytest.approx([rates[2], rates[5], rates[8]], abs=1e-12)


# -- presets in run.json; the user's options win ---------------------------------------------------------------------
def test_paper_preset_is_the_authors_and_is_recorded(tmp_path, world_features, capsys):
    out = tmp_path / "paper"
    assert (
        main(
            [
                "align",
                "--shards",
                shards(world_features),
                "--out",
                str(out),
                "--preset",
                "paper",
                "--anchors",
                "8",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    meta = json.loads((out / "run.json").read_text())
    cfg, rec = meta["config"], meta["preset"]
    assert rec["name"] == "paper" and rec["requested"] == "paper" and "preset paper" in printed
    authors = {
        "tau": 0.05,
        "tau_p": 0.03,
        "use_cls": True,
        "beta1": 0.9,
        "beta2": 0.95,
        "weight_decay": 1e-4,
        "warmup_epochs": 0.0,
        "schedule": "cosine_cycle",
        "cycle_epochs": 50.0,
        "grad_clip": 1.0,
        "grad_clip_mode": "per_group",
        "lr_finder": 100,
        "lr_finder_start": 1e-7,
        "lr_finder_end": 10.0,
    }
    assert {k: cfg[k] for k in authors} == authors and cfg["anchors"] == 8
    assert meta["run"]["patience"] == 200 and meta["run"]["epochs"] == 2  # the authors' patience; the given epochs
    finder = meta["fit"]["lr_finder"]
    assert 1 < finder["iters"] <= 100 and meta["fit"]["lr"] == finder["lr"]
    # the found rate is the peak of the schedule: epoch 0 ends at step 2 (3 steps of 8, 8, 2), T_max = 50 x (18 // 8)
    assert meta["history"][0]["lr"] == pytest.approx(finder["lr"] * (1 + math.cos(math.pi * 2 / 100)) / 2)
    assert meta["tokens"]["image"] == "patches+cls"
    # without --epochs / --batch-size the authors' 1000 epochs and batch 4096 (checked without training them)
    full = PAL.preset_plan("paper", {}, RunConfig(), 10)
    assert (full.run.epochs, full.run.batch_size, full.run.patience) == (1000, 4096, 200) and full.params == {}
    assert PAL.run_defaults == {"epochs": 1000, "batch_size": 4096, "patience": 200}


def test_auto_on_small_data_picks_on_heldout_pairs_and_says_so(tmp_path, world_features, capsys):
    out = tmp_path / "auto"
    assert (
        main(
            ["align", "--shards", shards(world_features), "--out", str(out), "--val-fraction", "0.25", "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    meta = json.loads((out / "run.json").read_text())
    rec = meta["preset"]
    assert rec["requested"] == "auto" and rec["name"] == "small" and "18 training pairs" in rec["why"]
    assert "preset small" in printed and rec["summary"] in printed
    tried = rec["tried"]
    assert [t["anchors"] for t in tried[: len(K_GRID)]] == list(K_GRID) and all("heldout_mean_r1" in t for t in tried)
    assert {t["use_cls"] for t in tried} == {False, True}
    best = max(tried, key=lambda t: (t["heldout_mean_r1"], -t["val_loss"]))
    assert meta["config"]["anchors"] == rec["chosen"]["anchors"] == best["anchors"]
    assert meta["config"]["use_cls"] == rec["chosen"]["use_cls"]
    assert meta["config"]["lr_finder"] == 0 and meta["run"]["batch_size"] == 4  # 18 pairs: batch 18 // 4
    # a repeated command reuses the finished run (its search is not run again)
    assert (
        main(
            ["align", "--shards", shards(world_features), "--out", str(out), "--val-fraction", "0.25", "--no-progress"]
        )
        == 0
    )
    assert json.loads((out / "run.json").read_text()) == meta


@pytest.mark.parametrize("preset", ["paper", "small", "auto"])
def test_given_anchors_epochs_and_lr_win_over_every_preset(tmp_path, world_features, preset):
    out = tmp_path / preset
    assert (
        main(
            [
                "align",
                "--shards",
                shards(world_features),
                "--out",
                str(out),
                "--preset",
                preset,
                "--anchors",
                "8",
                "--epochs",
                "2",
                "--lr",
                "0.05",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["anchors"] == 8 and meta["config"]["lr"] == 0.05 and meta["config"]["lr_finder"] == 0
    assert meta["run"]["epochs"] == 2 and len(meta["history"]) <= 2 and meta["fit"]["lr"] == 0.05
    assert all(t["anchors"] == 8 for t in meta["preset"].get("tried", []))


def test_preset_of_another_method_or_unknown_is_refused(tmp_path, world_features, capsys):
    for extra in (["--method", "linear", "--preset", "paper"], ["--preset", "fast"]):
        code = main(
            ["align", "--shards", shards(world_features), "--out", str(tmp_path / "x"), *extra, "--no-progress"]
        )
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and "--preset" in err and err.count("\n") == 1, err
