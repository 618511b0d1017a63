"""Tests of evaluate.metrics: hand-computed tiny cases, then random inputs against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipe_align.evaluate.metrics import (
    ConfusionMatrix,
    blocked_topk,
    blocked_topk_both,
    classification_metrics,
    miou_reference,
    retrieval_metrics,
    zero_shot_classifier,
)

S2 = 1 / math.sqrt(2)


# ----------------------------------------------------------------------------------------------------- classification


def test_zero_shot_classifier_hand() -> None:
    # class 0: [1,0] and [0,1] -> already unit -> mean [.5,.5] -> renormalised [1/sqrt2, 1/sqrt2]
    # class 1: [3,0] and [0,-2] -> unit [1,0], [0,-1] -> mean [.5,-.5] -> [1/sqrt2, -1/sqrt2]
    #   (without normalising first the mean would be [1.5,-1] -> [.832,-.555]: the big template would dominate)
    emb = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    cls = torch.tensor([0, 1, 0, 1])
    w = zero_shot_classifier(emb, cls, 2)
    torch.testing.assert_close(w, torch.tensor([[S2, S2], [S2, -S2]], dtype=torch.float64))


def test_zero_shot_classifier_half_input_and_missing_class() -> None:
    emb = torch.randn(6, 8).half()
    w = zero_shot_classifier(emb, torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    assert w.dtype == torch.float32 and w.shape == (3, 8)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="without any prompt"):
        zero_shot_classifier(emb, torch.tensor([0, 0, 1, 1, 1, 1]), 3)


def test_classification_hand() -> None:
    # 6 classes, 5 samples; labels [0, 0, 0, 1, 1]
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # label 0: rank 1 -> top1 hit, top5 hit, argmax 0
            [9.0, 8, 7, 6, 5, 4],  # label 0: rank 1 -> hit, hit
            [0.0, 5, 6, 4, 3, 2],  # label 0: lowest of 6 (rank 6) -> miss, miss; argmax 2 (a class not in labels)
            [1.0, 9, 2, 3, 4, 5],  # label 1: rank 1 -> hit, hit
            [6.0, 2, 5, 4, 3, 1],  # label 1: scores above it 6,5,4,3 -> rank 5 -> top1 miss, top5 hit; argmax 0
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = classification_metrics(logits, labels)
    # acc1 = 3/5; acc5 = 4/5
    # balanced: class 0 recall 2/3 (samples 0, 1), class 1 recall 1/2 (sample 3); class 2 predicted only -> not in mean
    #   -> (2/3 + 1/2) / 2 = 7/12
    assert m == pytest.approx({"acc1": 3 / 5, "acc5": 4 / 5, "balanced_acc": 7 / 12})


def test_classification_fewer_than_five_classes_has_no_acc5() -> None:
    # 3 classes: [.1,.7,.2] label 1 hit; [.5,.4,.1] label 1 miss -> acc1 1/2; class 1 recall 1/2 -> balanced 1/2
    m = classification_metrics(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1]]), torch.tensor([1, 1]))
    assert m == pytest.approx({"acc1": 0.5, "balanced_acc": 0.5})


def test_classification_random_vs_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 300, 9
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c - 1, (n,), generator=g)  # class c-1 never true, may be predicted
    m = classification_metrics(logits, labels)
    lg, lb = logits.tolist(), labels.tolist()
    ranks = [sum(v > row[y] for v in row) for row, y in zip(lg, lb, strict=True)]  # items strictly above the label
    assert m["acc1"] == pytest.approx(sum(r < 1 for r in ranks) / n)
    assert m["acc5"] == pytest.approx(sum(r < 5 for r in ranks) / n)
    recalls = []
    for cl in sorted(set(lb)):
        idx = [i for i in range(n) if lb[i] == cl]
        recalls.append(sum(max(range(c), key=lambda j, i=i: lg[i][j]) == cl for i in idx) / len(idx))
    assert m["balanced_acc"] == pytest.approx(sum(recalls) / len(recalls))


# ---------------------------------------------------------------------------------------------------------- retrieval


def test_retrieval_hand() -> None:
    # images i0=[1,0], i1=[0,1], i2=[-1,0]; captions (t0->i0, t1->i1, t2->i0, t3->i2):
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.1], [1.0, 0.2], [-1.0, 0.1], [-0.1, 1.0]])
    t2i = torch.tensor([0, 1, 0, 2])
    # text queries (cosines, text normalised):
    #   t0: i0 .995, i1 .0995, i2 -.995        -> its image i0 at rank 1
    #   t1: i0 .981, i1 .196,  i2 -.981        -> i1 at rank 2
    #   t2: i0 -.995, i1 .0995, i2 .995        -> i0 at rank 3
    #   t3: i0 -.0995, i1 .995, i2 .0995       -> i2 at rank 2
    #   image_retrieval R@1 = 1/4, R@2 = 3/4, R@3 = 4/4
    # image queries:
    #   i0 (positives t0, t2): t0 .995, t1 .981, t3 -.0995, t2 -.995 -> t0 at rank 1
    #   i1 (positive t1):      t3 .995, t1 .196, t0 = t2 .0995       -> rank 2
    #   i2 (positive t3):      t2 .995, t3 .0995, t1 -.981, t0 -.995 -> rank 2
    #   text_retrieval R@1 = 1/3, R@2 = 3/3, R@3 = 1
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2, 3))
    assert m == pytest.approx(
        {
            "image_retrieval_recall@1": 1 / 4,
            "image_retrieval_recall@2": 3 / 4,
            "image_retrieval_recall@3": 1.0,
            "text_retrieval_recall@1": 1 / 3,
            "text_retrieval_recall@2": 1.0,
            "text_retrieval_recall@3": 1.0,
        }
    )
    # embeddings are normalised inside: scaling rows changes nothing
    scaled = retrieval_metrics(img * torch.tensor([[3.0], [0.2], [7.0]]), txt * 5, t2i, ks=(1, 2, 3))
    assert scaled == m


def _brute_force_retrieval(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...]) -> dict:
    """Full float64 similarity matrix, python loops, 'sorted(...)[:k]' membership."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = txt @ img.T  # [M, N]
    n, m = img.shape[0], txt.shape[0]
    out = {}
    for k in ks:
        hits = 0
        for q in range(m):
            order = sorted(range(n), key=lambda j, q=q: -sim[q, j])
            hits += int(t2i[q] in order[:k])
        out[f"image_retrieval_recall@{k}"] = hits / m
        hits, queries = 0, 0
        for i in range(n):
            if i not in set(t2i.tolist()):  # no caption: recall 0/0, not a query
                continue
            queries += 1
            order = sorted(range(m), key=lambda j, i=i: -sim[j, i])
            hits += int(any(t2i[j] == i for j in order[:k]))
        out[f"text_retrieval_recall@{k}"] = hits / queries
    return out


def test_retrieval_random_vs_brute_force_several_captions() -> None:
    rng = np.random.default_rng(1)
    n, e = 40, 16
    per_image = rng.integers(1, 6, size=n)  # 1..5 captions per image
    per_image[7] = 0  # an image with no caption: no text-retrieval query, still an image-retrieval candidate
    t2i = np.repeat(np.arange(n), per_image)
    rng.shuffle(t2i)
    img = rng.normal(size=(n, e))
    txt = img[t2i] + 1.5 * rng.normal(size=(len(t2i), e))  # correlated so recalls are neither 0 nor 1
    ks = (1, 5, 10)
    ref = _brute_force_retrieval(img, txt, t2i, ks)
    got = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t2i), ks=ks, block=7)
    assert got == pytest.approx(ref, abs=1e-12)
    assert 0 < got["text_retrieval_recall@1"] < got["text_retrieval_recall@10"] < 1
    # float32 computation (what real runs use) agrees on these well-separated random scores
    got32 = retrieval_metrics(torch.from_numpy(img).float(), torch.from_numpy(txt).float(), torch.from_numpy(t2i), ks)
    assert got32 == pytest.approx(ref, abs=1e-12)


def test_retrieval_blocked_equals_unblocked() -> None:
    g = torch.Generator().manual_seed(2)
    img = torch.randn(50, 32, generator=g)
    t2i = torch.arange(50).repeat_interleave(3)
    txt = img[t2i] + torch.randn(150, 32, generator=g)
    full = retrieval_metrics(img, txt, t2i, block=10**6)
    for block in (1, 3, 17, 64):
        assert retrieval_metrics(img, txt, t2i, block=block) == full
    v1, i1 = blocked_topk(txt, img, 10, block=4)
    v2, i2 = torch.topk(txt @ img.T, 10, dim=1)
    torch.testing.assert_close(v1, v2)
    assert torch.equal(i1, i2)
    # both directions from one pass; blocks smaller than k_cols exercise the running merge
    cols = torch.topk((txt @ img.T).T, 12, dim=1).indices
    for block in (1, 5, 64, 1000):
        rows_b, cols_b = blocked_topk_both(txt, img, 10, 12, block=block)
        assert torch.equal(rows_b, i2) and torch.equal(cols_b, cols)
    # many queries: the per-key candidate lists are merged part-way (every 256 candidate columns)
    q, keys = torch.randn(600, 8, generator=g), torch.randn(20, 8, generator=g)
    sim = q @ keys.T
    for block in (2, 7, 300):  # 2 and 7: ~300 and ~600 candidate columns -> merged part-way
        rows_b, cols_b = blocked_topk_both(q, keys, 3, 12, block=block)
        assert torch.equal(rows_b, torch.topk(sim, 3, dim=1).indices)
        assert torch.equal(cols_b, torch.topk(sim.T, 12, dim=1).indices)


def test_retrieval_k_larger_than_candidates_and_bad_links() -> None:
    img, txt = torch.randn(3, 4), torch.randn(6, 4)
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    m = retrieval_metrics(img, txt, t2i, ks=(10,))
    assert m == {"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 1, 2, 3]))
    # more images than captions (most images caption-less: only the three captioned ones are text queries)
    rng = np.random.default_rng(5)
    img, txt, t2i = rng.normal(size=(12, 6)), rng.normal(size=(4, 6)), np.array([3, 3, 9, 0])
    ref = _brute_force_retrieval(img, txt, t2i, (1, 3))
    got = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t2i), ks=(1, 3), block=3)
    assert got == pytest.approx(ref, abs=1e-12)
    assert (got["text_retrieval_recall@3"] * 3).is_integer()  # a mean over the 3 captioned images, not over 12


def _recall_clip_benchmark(scores: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """clip_benchmark's recall_at_k (metrics/zeroshot_retrieval.py), rewritten: per query row, true positives among
    the top-k columns over all positives of the row (0/0 = NaN for a row without positives)."""
    top = torch.topk(scores, k, dim=1).indices
    true_pos = torch.gather(positive.float(), 1, top).sum(dim=1)
    return true_pos / positive.float().sum(dim=1)


def test_image_without_captions_is_no_text_retrieval_query() -> None:
    """Six images, five captioned with a caption equal to their image, one without a caption that the sixth caption
    resembles most: image->text is perfect over the five queries (R@10 1.0, not 5/6 = 0.83 as when the captionless
    image counted as a miss), and the captionless image still competes as a candidate for the captions' queries."""
    g = torch.Generator().manual_seed(7)
    img = torch.linalg.qr(torch.randn(16, 6, generator=g)).Q.T  # orthonormal rows: distinct, no ties
    t2i = torch.tensor([0, 1, 2, 3, 4])  # image 5 has no caption
    txt = img[t2i].clone()
    txt[4] = img[4] + 2.0 * img[5]  # caption of image 4, closer to image 5 (the captionless one)
    got = retrieval_metrics(img, txt, t2i, ks=(1, 10))
    positive = torch.zeros(5, 6, dtype=torch.bool)
    positive[torch.arange(5), t2i] = True
    sim = torch.nn.functional.normalize(txt, dim=1) @ torch.nn.functional.normalize(img, dim=1).T
    for k in (1, 10):
        i2t = _recall_clip_benchmark(sim.T, positive.T, min(k, 5))  # image queries over the 5 captions
        assert torch.isnan(i2t[5])  # clip_benchmark's 0/0 for the captionless image
        want_i2t = (i2t[~torch.isnan(i2t)] > 0).double().mean().item()  # that query left out of the mean
        want_t2i = (_recall_clip_benchmark(sim, positive, min(k, 6)) > 0).double().mean().item()
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(want_i2t, abs=1e-12)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(want_t2i, abs=1e-12)
    assert got["text_retrieval_recall@10"] == 1.0 and got["text_retrieval_recall@1"] == 1.0
    assert got["image_retrieval_recall@1"] == pytest.approx(4 / 5)  # caption 4 finds image 5 first


# ------------------------------------------------------------------------------------------------------- segmentation


def test_confusion_matrix_hand() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [5, 2, 0]])  # 5: outside [0,3) on a valid pixel; 0 under 255: ignored
    # valid pixels: (t0,p0) ok, (t0,p1), (t1,p1) ok, (t1,p5) wrong, (t2,p2) ok
    # class 0: TP 1, label 2, pred 1 -> union 2 -> IoU 1/2, acc 1/2
    # class 1: TP 1, label 2, pred 2 ((0,1),(0,2)) -> union 3 -> IoU 1/3, acc 1/2
    # class 2: TP 1, label 1, pred 1 -> IoU 1, acc 1
    # class 3 (only with num_classes=4): nowhere -> NaN, left out of the means
    # mIoU = (1/2 + 1/3 + 1)/3 = 11/18; mAcc = (1/2 + 1/2 + 1)/3 = 2/3; aAcc = 3 correct / 5 valid
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    m = cm.compute(["a", "b", "c"])
    expect = {
        "mIoU": 11 / 18,
        "mAcc": 2 / 3,
        "aAcc": 3 / 5,
        "iou/a": 1 / 2,
        "iou/b": 1 / 3,
        "iou/c": 1.0,
        "acc/a": 1 / 2,
        "acc/b": 1 / 2,
        "acc/c": 1.0,
    }
    assert m == pytest.approx(expect)
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert cm.compute() == pytest.approx(miou_reference([pred], [target], 3))  # reference names classes by index

    cm4 = ConfusionMatrix(4)
    cm4.update(pred.numpy(), target.numpy())
    m4 = cm4.compute()
    assert math.isnan(m4["iou/3"]) and math.isnan(m4["acc/3"])
    assert m4["mIoU"] == pytest.approx(11 / 18) and m4["mAcc"] == pytest.approx(2 / 3)


def test_class_only_predicted_counts_as_zero_iou() -> None:
    # target all class 0 (4 px); pred [0,0,0,1]: class 0 IoU 3/4, acc 3/4; class 1 union 1, TP 0 -> IoU 0
    # (kept in mIoU, mmseg), acc undefined (never true) -> NaN, out of mAcc. mIoU = 3/8, mAcc = 3/4, aAcc = 3/4
    cm = ConfusionMatrix(2)
    cm.update(np.array([[0, 0, 0, 1]], dtype=np.uint8), np.zeros((1, 4), dtype=np.uint8))
    m = cm.compute()
    assert m["iou/1"] == 0.0 and math.isnan(m["acc/1"])
    assert (m["mIoU"], m["mAcc"], m["aAcc"]) == pytest.approx((3 / 8, 3 / 4, 3 / 4))


def test_ade_reduce_zero_label() -> None:
    # raw ADE labels: 0 = "other" -> ignored; k -> k-1; 255 stays ignored
    raw = torch.tensor([[0, 1, 2], [3, 255, 1]])  # reduced: [[ign, 0, 1], [2, ign, 0]]
    pred = torch.tensor([[2, 0, 1], [2, 0, 1]])  # already in reduced space
    # counted pixels: (t0,p0) ok, (t1,p1) ok, (t2,p2) ok, (t0,p1) wrong; the pred 2 on raw 0 is not counted
    # class 0: TP 1, label 2, pred 1 -> IoU 1/2; class 1: TP 1, label 1, pred 2 -> IoU 1/2; class 2: IoU 1
    # mIoU = 2/3, aAcc = 3/4, mAcc = (1/2 + 1 + 1)/3 = 5/6
    cm = ConfusionMatrix(3, reduce_zero_label=True)
    cm.update(pred, raw)
    m = cm.compute()
    assert (m["iou/0"], m["iou/1"], m["iou/2"]) == pytest.approx((1 / 2, 1 / 2, 1.0))
    assert (m["mIoU"], m["aAcc"], m["mAcc"]) == pytest.approx((2 / 3, 3 / 4, 5 / 6))
    # a raw label above num_classes is a configuration bug, not something to drop silently
    with pytest.raises(ValueError, match="reduce_zero_label"):
        cm.update(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4]]))
    # without the reduction, raw label 3 is out of range for 3 classes
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(pred, raw)


def test_ade_reduce_zero_label_random_matches_manual_mapping() -> None:
    rng = np.random.default_rng(3)
    c = 6
    raws = [rng.integers(0, c + 1, size=(5, 7)) for _ in range(4)]
    for r in raws:
        r[rng.random(r.shape) < 0.1] = 255
    preds = [rng.integers(-1, c + 1, size=(5, 7)) for _ in range(4)]
    mapped = [np.where((r == 0) | (r == 255), 255, r - 1) for r in raws]
    cm = ConfusionMatrix(c, reduce_zero_label=True)
    for p, r in zip(preds, raws, strict=True):
        cm.update(p, r)
    assert cm.compute() == pytest.approx(miou_reference(preds, mapped, c), nan_ok=True)


def test_voc_foreground_exclusion_of_background() -> None:
    # classes (background, cat, dog); target [0,0,1,2], pred [0,1,1,2]
    # background: TP 1, label 2, pred 1 -> IoU 1/2; cat: TP 1, label 1, pred 2 -> 1/2; dog: 1
    # mIoU over all 3 = 2/3; PAL foreground mIoU (exclude background) = (1/2 + 1)/2 = 3/4
    # mAcc all = (1/2 + 1 + 1)/3 = 5/6, foreground = 1; aAcc = 3/4 either way
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 0, 1, 2]]))
    names = ["background", "cat", "dog"]
    full = cm.compute(names)
    fg = cm.compute(names, exclude=(0,))
    assert (full["mIoU"], full["mAcc"], full["aAcc"]) == pytest.approx((2 / 3, 5 / 6, 3 / 4))
    assert (fg["mIoU"], fg["mAcc"], fg["aAcc"]) == pytest.approx((3 / 4, 1.0, 3 / 4))
    assert fg["iou/background"] == pytest.approx(1 / 2)  # still reported
    # "standard" VOC20: background pixels ignored entirely (reduce_zero_label), 2 classes cat/dog predicted
    # target [0,0,1,2] -> [ign, ign, 0, 1]; pred over (cat, dog) [?, ?, 0, 1] -> both perfect
    cm20 = ConfusionMatrix(2, reduce_zero_label=True)
    cm20.update(torch.tensor([[1, 0, 0, 1]]), torch.tensor([[0, 0, 1, 2]]))
    assert cm20.compute(["cat", "dog"])["mIoU"] == 1.0


def test_confusion_matrix_random_vs_reference() -> None:
    rng = np.random.default_rng(4)
    c = 7
    preds, targets = [], []
    cm = ConfusionMatrix(c)
    for shape in [(9, 13), (16, 16), (4, 30), (1, 1)]:
        t = rng.integers(0, c - 1, size=shape)  # class c-1 never in the target (only predicted)
        t[rng.random(shape) < 0.2] = 255
        p = rng.integers(-2, c + 2, size=shape)  # some predictions out of range
        preds.append(p)
        targets.append(t)
        cm.update(torch.from_numpy(p), torch.from_numpy(t).to(torch.uint8))
    # a batch [N, H, W] counts the same as its images one by one
    tb = rng.integers(0, c, size=(3, 8, 8))
    tb[rng.random(tb.shape) < 0.2] = 255
    pb = rng.integers(0, c, size=(3, 8, 8))
    cm.update(pb, tb)
    preds += list(pb)
    targets += list(tb)
    ref = miou_reference(preds, targets, c)
    got = cm.compute()
    assert got == pytest.approx(ref, nan_ok=True)
    assert not math.isnan(got["acc/6"])  # class 6 appears in the batch targets
    # exclusion = recomputing the mean by hand over the kept classes
    fg = cm.compute(exclude=(0, 3))
    kept = [got[f"iou/{i}"] for i in range(c) if i not in (0, 3)]
    assert fg["mIoU"] == pytest.approx(float(np.nanmean(kept)))
    # merge equals one accumulator
    a, b = ConfusionMatrix(c), ConfusionMatrix(c)
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        (a if i % 2 else b).update(p, t)
    a.merge(b)
    assert torch.equal(a.matrix, cm.matrix)


def test_confusion_matrix_input_checks() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(np.zeros((2, 2), dtype=int), np.zeros((2, 3), dtype=int))
    with pytest.raises(TypeError):
        cm.update(np.zeros((2, 2)), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros((1, 2), dtype=int), np.array([[0, 3]]))
    with pytest.raises(ValueError, match="class names"):
        cm.compute(["a"])
    # nothing counted: every metric undefined
    m = cm.compute()
    assert all(math.isnan(v) for v in m.values())
