"""Baselines (procrustes, cca, csa, asif, linear, mlp, sotalign): closed forms against direct numpy computations,
planted correspondences recovered, KLOT's closed-form gradient against autograd through Sinkhorn, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipe_align.align.asif import ASIF, ASIFConfig
from pipe_align.align.base import Aligner, ImageRows, TextRows, TrainedAligner, TrainingData, l2n
from pipe_align.align.cca import CCA, CSA, CCAConfig
from pipe_align.align.contrastive import LinearConfig, LinearHeads, MLPConfig, MLPHeads, structure_loss
from pipe_align.align.data import Batch, part_bounds
from pipe_align.align.loop import RunConfig
from pipe_align.align.loop import fit as loop_fit
from pipe_align.align.methods import get_method, load_aligner, method_names
from pipe_align.align.procrustes import Procrustes, ProcrustesConfig
from pipe_align.align.sotalign import SOTAlign, SOTAlignConfig, klot, ot_plan, sinkhorn_log
from pipe_align.extract.errors import PipeError
from tests.contract import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


class FakePairs:
    """In-memory stand-in for align.data.PairSource: the same `batches` contract (one caption per image per epoch,
    drawn from the epoch seed; shuffled order per epoch)."""

    def __init__(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        patches: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        length: torch.Tensor | None = None,
    ) -> None:
        self.img, self.patches = img, patches
        self.txt = txt if txt.dim() == 3 else txt[:, None]  # [N, captions, D]
        self.tokens = tokens if tokens is None or tokens.dim() == 4 else tokens[:, None]
        self.length = length if length is None or length.dim() == 2 else length[:, None]

    def __len__(self) -> int:
        return len(self.img)

    def batches(self, epoch: int, batch_size: int, seed: int, shuffle: bool = True, part=None):
        n = len(self.img)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        caps = np.random.default_rng([seed, epoch, 7]).integers(0, self.txt.shape[1], n)
        for b0 in range(0, n, batch_size):
            whole = order[b0 : b0 + batch_size]
            lo, hi, sizes = part_bounds(len(whole), part)
            idx = whole[lo:hi]
            ii, cc = torch.as_tensor(idx), torch.as_tensor(caps[idx])
            image = ImageRows(cls=self.img[ii], patches=None if self.patches is None else self.patches[ii])
            text = TextRows(
                pooled=self.txt[ii, cc],
                tokens=None if self.tokens is None else self.tokens[ii, cc],
                length=None if self.length is None else self.length[ii, cc],
            )
            yield Batch(image, text, idx, sizes)


def fit(cls, config, train, val=None, unpaired=None, **run):
    """Any method through the one loop (closed forms fit directly); returns the aligner and its per-epoch history."""
    result = loop_fit(cls, config, RunConfig(**run), TrainingData(train, val, unpaired))
    return result.aligner, result.history


def top1(img: torch.Tensor, txt: torch.Tensor) -> float:
    return float(((img @ txt.T).argmax(1) == torch.arange(len(img))).float().mean())


def orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q.float()


def planted(n: int = 800, di: int = 32, dt: int = 24, noise: float = 0.05, seed: int = 0):
    """Image rows with a 16-dim signal; text = an isometric copy of the signal (+ noise), so Y = X Q + noise for a
    semi-orthogonal Q. Returns train and test (image, text) tensors."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 16, generator=gen) + 0.3
    x = z @ orthogonal(di, gen)[:16] + noise * torch.randn(n, di, generator=gen)
    y = torch.cat([z, torch.zeros(n, dt - 16)], 1) @ orthogonal(dt, gen) + noise * torch.randn(n, dt, generator=gen)
    cut = n * 3 // 4
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def tokens_for(n: int, d: int, length: int, gen: torch.Generator):
    tok = torch.randn(n, length, d, generator=gen)
    lens = torch.randint(1, length + 1, (n,), generator=gen)
    return tok, lens


# -- closed forms ------------------------------------------------------------------------------------------------------
def test_procrustes_rotation_is_uv_of_svd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    al, _ = fit(Procrustes, ProcrustesConfig(), FakePairs(torch.tensor(x).float(), torch.tensor(y).float()))
    xn = x - x.mean(0)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    yn = y - y.mean(0)
    yn /= np.linalg.norm(yn, axis=1, keepdims=True)
    u, _, vt = np.linalg.svd(xn.T @ yn)
    np.testing.assert_allclose(al.rotation.numpy(), u @ vt, atol=1e-5)
    np.testing.assert_allclose(al.basis_img.numpy(), np.eye(8), atol=0)


def test_cca_correlations_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6))
    y = x[:, :5] @ rng.normal(size=(5, 5)) + rng.normal(size=(400, 5))
    al, _ = fit(CCA, CCAConfig(reg=0.0), FakePairs(torch.tensor(x).float(), torch.tensor(y).float()))
    xc, yc = x - x.mean(0), y - y.mean(0)
    cxx, cyy, cxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    evals = np.linalg.eigvals(np.linalg.solve(cxx, cxy) @ np.linalg.solve(cyy, cxy.T)).real
    rho_np = np.sqrt(np.sort(np.clip(evals, 0, None))[::-1][:5])
    np.testing.assert_allclose(al.rho.numpy(), rho_np, atol=1e-4)
    # the canonical coordinates are correlated by rho and uncorrelated within a side
    u, v = xc @ al.proj_img.double().numpy(), yc @ al.proj_txt.double().numpy()
    corr = np.corrcoef(u.T, v.T)
    np.testing.assert_allclose(np.diag(corr[:5, 5:]), rho_np, atol=1e-4)
    np.testing.assert_allclose(corr[:5, :5], np.eye(5), atol=1e-4)


def test_csa_weights_canonical_coordinates_by_sqrt_rho():
    (x, y), (xt, yt) = planted(noise=0.3)
    train = FakePairs(x, y)
    (cca, _), (csa, _) = fit(CCA, CCAConfig(rank=8), train), fit(CSA, CCAConfig(rank=8), train)
    rho = cca.rho
    for a, b in (
        (cca.image_global(ImageRows(cls=xt)), csa.image_global(ImageRows(cls=xt))),
        (cca.text_global(TextRows(pooled=yt)), csa.text_global(TextRows(pooled=yt))),
    ):
        torch.testing.assert_close(b, l2n(a * rho.sqrt()))


def pal_authors_csa_reference(x: np.ndarray, y: np.ndarray, r: int) -> tuple:
    """The PAL authors' CSA written out as cca_zoo computes it: each centred view reduced by PCA to the fewest
    components whose cumulative explained-variance ratio exceeds 0.999 (scikit-learn's rule), then unregularised CCA
    as the generalized eigenproblem [[0, Cxy], [Cyx, 0]] w = rho blockdiag(Cxx, Cyy) w (scipy.linalg.eigh), top r."""
    from scipy.linalg import eigh

    def pca(z):
        zc = z - z.mean(0)
        _, sv, vt = np.linalg.svd(zc, full_matrices=False)
        ratio = np.cumsum(sv**2) / np.sum(sv**2)
        k = int(np.searchsorted(ratio, 0.999, side="right")) + 1
        return vt[:k].T, z.mean(0)

    (px, mx), (py, my) = pca(x), pca(y)
    sx, sy = (x - mx) @ px, (y - my) @ py
    kx, n = sx.shape[1], len(x)
    a, b = np.zeros((kx + sy.shape[1],) * 2), np.zeros((kx + sy.shape[1],) * 2)
    a[:kx, kx:] = sx.T @ sy / n
    a[kx:, :kx] = a[:kx, kx:].T
    b[:kx, :kx], b[kx:, kx:] = sx.T @ sx / n, sy.T @ sy / n
    rho, w = eigh(a, b)
    top = np.argsort(rho)[::-1][:r]
    return rho[top], px @ w[:kx, top], py @ w[kx:, top], mx, my, (kx, sy.shape[1])


def test_csa_pal_authors_variant_is_unregularised_cca_on_999_pca_with_plain_cosine():
    rng = np.random.default_rng(4)
    n = 300
    shared = rng.normal(size=(n + 50, 4))
    x = np.hstack(
        [shared @ rng.normal(size=(4, 7)) + 0.5 * rng.normal(size=(n + 50, 7)), 1e-4 * rng.normal(size=(n + 50, 3))]
    )  # 3 near-constant columns the PCA drops
    y = np.hstack(
        [shared @ rng.normal(size=(4, 6)) + 0.5 * rng.normal(size=(n + 50, 6)), 1e-4 * rng.normal(size=(n + 50, 2))]
    )
    r = 5
    rho, wx, wy, mx, my, kept = pal_authors_csa_reference(x[:n], y[:n], r)
    assert kept[0] < 10 and kept[1] < 8  # the PCA step did drop components
    train = FakePairs(torch.tensor(x[:n]).double(), torch.tensor(y[:n]).double())
    csa, _ = fit(CSA, CCAConfig(rank=r, variant="pal-authors"), train)
    np.testing.assert_allclose(csa.rho.numpy(), rho, atol=1e-4)
    # plain cosine of the canonical coordinates of held-out rows, image-text and image-image
    ref_img = (x[n:] - mx) @ wx
    ref_txt = (y[n:] - my) @ wy
    ref_img /= np.linalg.norm(ref_img, axis=1, keepdims=True)
    ref_txt /= np.linalg.norm(ref_txt, axis=1, keepdims=True)
    img = csa.image_global(ImageRows(cls=torch.tensor(x[n:]).float())).double().numpy()
    txt = csa.text_global(TextRows(pooled=torch.tensor(y[n:]).float())).double().numpy()
    np.testing.assert_allclose(img @ txt.T, ref_img @ ref_txt.T, atol=2e-4)
    np.testing.assert_allclose(img @ img.T, ref_img @ ref_img.T, atol=2e-4)
    # the default (CSA's authors' definition) weights by rho and keeps the ridge: different scores
    default, _ = fit(CSA, CCAConfig(rank=r), train)
    other = default.image_global(ImageRows(cls=torch.tensor(x[n:]).float())).double().numpy()
    assert np.abs(other @ txt.T - img @ txt.T).max() > 1e-2
    with pytest.raises(PipeError, match="rank=9: the PCA keeping 99.9% of the variance leaves"):
        fit(CSA, CCAConfig(rank=9, variant="pal-authors"), train)
    with pytest.raises(PipeError, match="variant='cca-zoo': must be one of ridge, pal-authors"):
        CCAConfig(variant="cca-zoo").check()


# -- planted correspondences -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["procrustes", "cca", "csa"])
def test_planted_correspondence_is_recovered(method):
    (x, y), (xt, yt) = planted()
    cfg = get_method(method).Config(**({"rank": 16} if method == "cca" else {}))  # cca: equal weights, so keep
    al, _ = fit(get_method(method), cfg, FakePairs(x, y))  # only the 16 signal directions
    img, txt = al.image_global(ImageRows(cls=xt)), al.text_global(TextRows(pooled=yt))
    assert top1(img, txt) > 0.95
    key = "rotation" if method == "procrustes" else "proj_img"
    random = torch.randn(*getattr(al, key).shape, generator=torch.Generator().manual_seed(3))
    setattr(al, key, torch.linalg.qr(random)[0])
    assert top1(al.image_global(ImageRows(cls=xt)), txt) < 0.2


def test_asif_identical_modalities_retrieve_perfectly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen)
    al, _ = fit(ASIF, ASIFConfig(k=50), FakePairs(x[:200], x[:200].clone()))
    img, txt = al.image_global(ImageRows(cls=x[200:])), al.text_global(TextRows(pooled=x[200:]))
    assert img.shape == (100, 200) and top1(img, txt) == 1.0
    assert int((img[0] > 0).sum()) <= 50
    torch.testing.assert_close(img.norm(dim=1), torch.ones(100))


def test_asif_planted_correspondence_beats_chance():
    (x, y), (xt, yt) = planted(n=1200, noise=0.05)
    al, _ = fit(ASIF, ASIFConfig(k=100, n_anchors=600), FakePairs(x, y))
    assert al.anchors_img.shape[0] == 600
    assert top1(al.image_global(ImageRows(cls=xt)), al.text_global(TextRows(pooled=yt))) > 0.5


# -- contrastive heads -------------------------------------------------------------------------------------------------
def contrastive_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(800, 32, generator=gen)
    y = x @ torch.randn(32, 24, generator=gen) / 32**0.5 + 0.1 * torch.randn(800, 24, generator=gen)
    return FakePairs(x[:500], y[:500]), FakePairs(x[500:600], y[500:600]), (x[600:], y[600:])


@pytest.mark.parametrize("cls,cfg", [(LinearHeads, LinearConfig), (MLPHeads, MLPConfig)])
def test_contrastive_heads_learn_planted_pairs(cls, cfg):
    train, val, (xt, yt) = contrastive_data()
    config = cfg(dim=64, hidden=128) if cls is MLPHeads else cfg(dim=64)
    al, hist = fit(cls, config, train, val, epochs=30, batch_size=128)
    assert "val_loss" in hist[0] and "train_loss" in hist[0]
    assert top1(al.image_global(ImageRows(cls=xt)), al.text_global(TextRows(pooled=yt))) > 0.5  # chance: 0.005


def test_structure_changes_the_loss_and_training_is_deterministic():
    train, _, _ = contrastive_data()
    runs = {}
    for w in (0.0, 10.0, 10.0):
        al, hist = fit(
            LinearHeads,
            LinearConfig(dim=32, structure_weight=w, structure_warmup_steps=4),
            train,
            epochs=3,
            batch_size=128,
        )
        runs.setdefault(w, []).append((hist, al.state_dict()))
    ((h0, s0),) = runs[0.0]
    (h1, s1), (h2, s2) = runs[10.0]
    assert h1[-1]["structure"] > 0 and h0[-1]["structure"] == 0
    assert h1[-1]["train_loss"] != h0[-1]["train_loss"]
    assert not torch.equal(s0["img.weight"], s1["img.weight"])
    timing = ("seconds", "pairs_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in h1] == [
        {k: v for k, v in h.items() if k not in timing} for h in h2
    ]  # same seed, same run
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_structure_loss_zero_for_identical_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20, 8, generator=gen)
    assert float(structure_loss(z, z.clone(), 0.05, levels=2)) < 1e-9
    assert float(structure_loss(z, torch.randn(20, 8, generator=gen), 0.05)) > 1e-3


def test_token_pool_uses_valid_tokens_only():
    gen = torch.Generator().manual_seed(0)
    n = 64
    patches = torch.randn(n, 5, 12, generator=gen)
    tok, lens = tokens_for(n, 10, 6, gen)
    train = FakePairs(patches.mean(1), torch.randn(n, 10, generator=gen), patches=patches, tokens=tok, length=lens)
    cfg = MLPConfig(pool="token", dim=16, hidden=32)
    assert MLPHeads.wants_tokens(cfg) and not MLPHeads.wants_tokens(MLPConfig())
    al, _ = fit(MLPHeads, cfg, train, epochs=2, batch_size=32)
    rows = TextRows(pooled=torch.zeros(n, 10), tokens=tok.clone(), length=lens)
    before = al.text_global(rows)
    rows.tokens[torch.arange(6)[None, :] >= lens[:, None]] = 100.0  # padding must not matter
    torch.testing.assert_close(al.text_global(rows), before)
    assert al.image_global(ImageRows(cls=patches[:, 0], patches=patches)).shape == (n, 16)


# -- SOTAlign / KLOT ---------------------------------------------------------------------------------------------------
def test_klot_closed_form_gradient_equals_autograd_through_sinkhorn():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    target = ot_plan(torch.randn(6, 5, generator=gen, dtype=torch.float64), 0.2, 3000)
    eps, n_iter = 0.3, 3000
    k1 = k.clone().requires_grad_()
    value = klot(k1, target, eps, n_iter)
    value.backward()
    k2 = k.clone().requires_grad_()
    log_p = sinkhorn_log(k2 / eps, n_iter)  # unrolled, differentiated by autograd
    ref = (torch.xlogy(target, target) - target * log_p).sum()
    ref.backward()
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(k1.grad, k2.grad, atol=1e-9, rtol=1e-7)
    plan = log_p.exp()
    torch.testing.assert_close(plan.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64))


def test_sotalign_starts_at_teacher_and_klot_trains_on_unpaired_rows():
    (x, y), (xt, yt) = planted(noise=0.1)
    train = FakePairs(x[:200], y[:200])
    frozen, _ = fit(SOTAlign, SOTAlignConfig(lr=0.0), train, epochs=1, batch_size=64)
    teacher, _ = fit(Procrustes, ProcrustesConfig(), train)
    for a, b in (
        (frozen.image_global(ImageRows(cls=xt)), teacher.image_global(ImageRows(cls=xt))),
        (frozen.text_global(TextRows(pooled=yt)), teacher.text_global(TextRows(pooled=yt))),
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # cca teacher (rank 24 keeps noise directions, so it is imperfect); unpaired rows in another order; full batch
    unpaired = (ImageRows(cls=x[200:400]), TextRows(pooled=y[200:400].flip(0)))
    cfg = SOTAlignConfig(teacher="cca", lr=1e-2)
    al, hist = fit(SOTAlign, cfg, train, FakePairs(xt[:50], yt[:50]), unpaired, epochs=8, batch_size=256, patience=0)
    assert "init_val_loss" in hist[0]  # the teacher's held-out loss: the candidate to beat
    assert hist[-1]["klot"] < 0.9 * hist[0]["klot"]
    cca, _ = fit(CCA, CCAConfig(), train)
    before = top1(cca.image_global(ImageRows(cls=xt)), cca.text_global(TextRows(pooled=yt)))
    assert top1(al.image_global(ImageRows(cls=xt)), al.text_global(TextRows(pooled=yt))) >= before - 0.02


# -- interface ---------------------------------------------------------------------------------------------------------
def fitted(method: str, train: FakePairs, val: FakePairs) -> Aligner:
    cls = get_method(method)
    run = {"epochs": 2, "batch_size": 64} if issubclass(cls, TrainedAligner) else {}
    return fit(cls, cls.Config(**SMALL[method]), train, val, **run)[0]


# every method that maps global features (the token-level ones, PAL and pal-fixed, need stores: test_contract.py)
@pytest.mark.parametrize("method", [m for m in method_names() if not get_method(m).needs_tokens])
def test_save_load_roundtrip_and_dense_shapes(method, tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 12, generator=gen), torch.randn(120, 10, generator=gen)
    al = fitted(method, FakePairs(x[:100], y[:100]), FakePairs(x[100:], y[100:]))
    patches = torch.randn(3, 7, 12, generator=gen)
    img, txt, dense = al.image_global(ImageRows(cls=x)), al.text_global(TextRows(pooled=y)), al.image_dense(patches)
    e = img.shape[1]
    assert txt.shape == (120, e) and dense.shape == (3, 7, e)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(120))
    torch.testing.assert_close(al.image_dense(x[:, None])[:, 0], img)  # dense = the global map per token
    al.save(tmp_path / "run")
    back = load_aligner(tmp_path / "run")
    assert type(back) is type(al) and back.config == al.config
    assert torch.equal(back.image_global(ImageRows(cls=x)), img)
    assert torch.equal(back.text_global(TextRows(pooled=y)), txt)
    assert torch.equal(back.image_dense(patches), dense)


def test_mean_image_feature_needs_patches():
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(40, 4, 8, generator=gen)
    cfg = CCAConfig(image_feature="mean", rank=4)
    assert CCA.wants_tokens(cfg) and not CCA.wants_tokens(CCAConfig()) and CCA(cfg).needs_tokens
    al, _ = fit(CCA, cfg, FakePairs(patches[:, 0], torch.randn(40, 6, generator=gen), patches=patches))
    assert al.image_global(ImageRows(cls=patches[:, 0], patches=patches)).shape == (40, 4)
    with pytest.raises(PipeError, match="patch tokens"):
        al.image_global(ImageRows(cls=patches[:, 0]))
    with pytest.raises(PipeError, match="image_feature"):
        CCAConfig(image_feature="max")


# -- the authors' definitions (written out here, independently of the code under test) --------------------------------
def test_structure_divergence_is_the_reference_codes_by_default():
    """STRUCTURE's code: 1/2 [KL(M || A) + KL(M || O)], M the mixture; the textbook JS is the named variant."""
    from pipe_align.align.contrastive import neighbourhood_divergence

    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(9), size=7), rng.dirichlet(np.ones(9) * 0.3, size=7)
    m = (p + q) / 2
    reference = np.mean(0.5 * ((m * np.log(m / p)).sum(1) + (m * np.log(m / q)).sum(1)))
    textbook = np.mean(0.5 * ((p * np.log(p / m)).sum(1) + (q * np.log(q / m)).sum(1)))
    assert abs(reference - textbook) > 1e-3  # the two definitions differ on this input
    tp, tq = torch.from_numpy(p), torch.from_numpy(q)
    assert LinearConfig().structure_divergence == "reference"
    assert float(neighbourhood_divergence(tp, tq)) == pytest.approx(reference, rel=1e-6)  # eps=1e-12 in the logs
    assert float(neighbourhood_divergence(tp, tq, "js")) == pytest.approx(textbook, rel=1e-6)
    with pytest.raises(PipeError, match="structure_divergence"):
        LinearConfig(structure_divergence="kl")


def test_asif_raises_the_raw_top_k_similarities_to_p():
    """ASIF: cosine similarities to the anchors, the top k kept as they are (negative ones too), to the power p, the
    rest zero, L2-normalised. Clamping negatives at 0 is our named variant."""
    from pipe_align.align.asif import relative_representation

    rng = np.random.default_rng(1)
    z, anchors, k, p = rng.normal(size=(6, 5)), rng.normal(size=(12, 5)), 9, 3.0  # odd p: the sign shows
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    an = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    sims = zn @ an.T

    def expected(clamp: bool) -> np.ndarray:
        rep = np.zeros_like(sims)
        for i, row in enumerate(sims):
            top = np.argsort(-row)[:k]
            rep[i, top] = (np.maximum(row[top], 0) if clamp else row[top]) ** p
        return rep / np.linalg.norm(rep, axis=1, keepdims=True)

    assert (np.sort(sims, axis=1)[:, -k:] < 0).any()  # negative similarities are among the kept ones
    z32, a32 = torch.from_numpy(z).float(), torch.from_numpy(an).float()
    got = relative_representation(z32, a32, k, p).numpy()
    np.testing.assert_allclose(got, expected(False), atol=1e-5)
    assert np.abs(got - expected(True)).max() > 1e-2
    np.testing.assert_allclose(
        relative_representation(z32, a32, k, p, clamp_negative=True).numpy(), expected(True), atol=1e-5
    )
    assert ASIFConfig().clamp_negative is False
    with pytest.raises(PipeError, match="integer p"):
        ASIFConfig(p=2.5)
    ASIFConfig(p=2.5, clamp_negative=True)


def test_klot_is_the_authors_symmetric_sinkhorn_by_default():
    """SOTAlign's klot.py: log-domain Sinkhorn on cost -K (uniform marginals, n_iter rounds of a row then a column
    update), then by default (symmetric=True) both potentials averaged with one more update computed from the final
    ones; KLOT = KL(P* || P), gradient (P - P*) / eps_student. Written out in numpy, float64, at the defaults."""

    def lse(a: np.ndarray, axis: int) -> np.ndarray:
        top = a.max(axis=axis, keepdims=True)
        return np.squeeze(top, axis) + np.log(np.exp(a - top).sum(axis=axis))

    def log_plan(k: np.ndarray, eps: float, n_iter: int, symmetric: bool) -> np.ndarray:
        g = k / eps
        n, m = g.shape
        u, v = np.zeros(n), np.zeros(m)
        for _ in range(n_iter):
            u = -np.log(n) - lse(g + v[None, :], 1)
            v = -np.log(m) - lse(g + u[:, None], 0)
        if symmetric:
            u, v = (u + (-np.log(n) - lse(g + v[None, :], 1))) / 2, (v + (-np.log(m) - lse(g + u[:, None], 0))) / 2
        return g + u[:, None] + v[None, :]

    cfg = SOTAlignConfig()
    assert (cfg.eps, cfg.eps_teacher, cfg.n_iter, cfg.sinkhorn_symmetric) == (0.05, 0.005, 100, True)
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(7, 9)) * 0.3, rng.normal(size=(7, 9)) * 0.3  # cosine-like affinities

    def expected(symmetric: bool) -> tuple[float, np.ndarray]:
        lp, lt = log_plan(student, 0.05, 100, symmetric), log_plan(teacher, 0.005, 100, symmetric)
        return float((np.exp(lt) * (lt - lp)).sum()), (np.exp(lp) - np.exp(lt)) / 0.05

    def got(symmetric: bool) -> tuple[float, np.ndarray]:
        k = torch.from_numpy(student).requires_grad_()
        target = ot_plan(torch.from_numpy(teacher), 0.005, 100, symmetric)
        value = klot(k, target, 0.05, 100, symmetric)
        value.backward()
        return float(value.detach()), k.grad.numpy()

    ref_value, ref_grad = expected(True)
    old_value, old_grad = expected(False)
    assert abs(ref_value - old_value) > 1e-4 and np.abs(ref_grad - old_grad).max() > 1e-3  # the variants differ here
    value, grad = got(True)
    assert value == pytest.approx(ref_value, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-10)
    value, grad = got(False)  # the named variant: ends on the column update
    assert value == pytest.approx(old_value, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grad, old_grad, rtol=1e-9, atol=1e-10)


# -- ADE20K under the two segmentation protocols ---------------------------------------------------------------------
def test_ade20k_pal_protocol_is_151_way_and_counts_class_zero_once_predicted():
    """The PAL authors' ADE20K evaluation (zero_shot_segmentation.py: 151 classes, ignore_index 0, IoU over classes
    with a non-empty union): every class competes, including class 0's prompt; pixels labelled 0 are not counted;
    a pixel predicted 0 is a miss, and class 0 enters the mean with IoU 0. `standard` keeps mmseg's rule: 150-way over
    classes 1..150, label 0 ignored. Hand-made 3x4 image, mIoU of both computed here pixel by pixel."""
    from pipe_align.evaluate.metrics import ConfusionMatrix
    from pipe_align.evaluate.segmentation import count_image, label_spaces
    from pipe_align.extract.datasets.ade20k import ADE20K, ADE20K_CLASSES

    mask = np.array([[0, 1, 1, 2], [0, 2, 2, 2], [5, 5, 0, 1]])
    best = np.array([[0, 1, 0, 2], [1, 2, 0, 2], [5, 3, 0, 1]])  # argmax over all 151 classes
    second = np.array([[1, 7, 2, 9], [9, 9, 2, 9], [9, 9, 5, 9]])  # runner-up (the argmax when 0 cannot win)
    scores = np.full((151, 3, 4), -1.0)
    for y, x in np.ndindex(mask.shape):
        scores[best[y, x], y, x], scores[second[y, x], y, x] = 1.0, 0.5

    def miou(pred: np.ndarray) -> float:
        keep = mask != 0
        ious = []
        for c in range(151):
            inter = ((pred == c) & (mask == c) & keep).sum()
            union = (((pred == c) | (mask == c)) & keep).sum()
            if union:
                ious.append(inter / union)
        return float(np.mean(ious))

    expected = {"pal": miou(best), "standard": miou(np.where(best == 0, second, best))}
    assert expected["pal"] < expected["standard"]  # predicted 0 on a labelled pixel costs the pal number
    void = ADE20K.ignore_index
    for protocol, (name, n_classes) in {"pal": ("zero-competes", 151), "standard": ("zero-ignored", 150)}.items():
        (space,) = label_spaces(protocol, ADE20K, list(ADE20K_CLASSES))
        assert (space.name, len(space.candidates)) == (name, n_classes)
        cm = ConfusionMatrix(len(space.candidates), void)
        count_image(space, space.target_map(void), cm, torch.from_numpy(scores).float(), torch.from_numpy(mask))
        names = [ADE20K_CLASSES[c] for c in space.candidates]
        assert cm.compute(names)["mIoU"] == pytest.approx(expected[protocol], abs=1e-12), protocol


# -- the STRUCTURE code's heads, inputs, optimiser and warm-up -------------------------------------------------------
def test_mlp_is_the_structure_codes_residual_low_rank_head_on_raw_features():
    """ResLowRankHead (their mlp.py): z = P x + sigmoid(logit) * W2 dropout(GELU(W1 x)), P and W1 orthogonal without
    bias, W2 zero, rank 64, dropout 0.1, gate_init 0 (logit -inf: the residual never opens); inputs as stored."""
    from pipe_align.align.contrastive import ResLowRankHead

    cfg = MLPConfig()
    assert (cfg.head, cfg.rank, cfg.dropout, cfg.gate_init) == ("reslowrank", 64, 0.1, 0.0)
    assert not (cfg.normalize_inputs or cfg.center)
    train, _, (xt, yt) = contrastive_data()
    scale = 7.0  # raw features are not normalised: a scale reaches the head unchanged
    train = FakePairs(train.img * scale, train.txt[:, 0])
    al, _ = fit(MLPHeads, MLPConfig(dim=16, rank=8), train, epochs=3, batch_size=128)
    state = {k: v.double() for k, v in al.state_dict().items()}
    p, w1, w2 = state["img.P.weight"], state["img.W1.weight"], state["img.W2.weight"]
    assert p.shape == (16, 32) and w1.shape == (8, 32) and "img.P.bias" not in state
    assert torch.count_nonzero(w2) == 0  # no gradient ever reaches W2 through a zero gate
    x = xt.double() * scale
    expected = torch.nn.functional.normalize(x @ p.T, dim=1)  # alpha = 0: the skip projection alone
    torch.testing.assert_close(al.image_global(ImageRows(cls=xt * scale)).double(), expected, atol=1e-5, rtol=1e-5)

    # an open gate: the residual as written in their forward (dropout off outside training)
    gen = torch.Generator().manual_seed(1)
    head = ResLowRankHead(6, 5, 3, 0.1, 0.25)
    with torch.no_grad():
        head.W2.weight.copy_(torch.randn(5, 3, generator=gen))
    z = torch.randn(4, 6, generator=gen)
    alpha = 1 / (1 + np.exp(-np.log(0.25 / 0.75)))
    ref = z @ head.P.weight.T + alpha * (torch.nn.functional.gelu(z @ head.W1.weight.T) @ head.W2.weight.T)
    torch.testing.assert_close(head(z), ref)
    torch.testing.assert_close(head.P.weight @ head.P.weight.T, torch.eye(5), atol=1e-5, rtol=0)  # orthogonal rows
    dropped = head(z, torch.Generator().manual_seed(0))
    assert not torch.allclose(dropped, ref) and dropped.shape == ref.shape


def test_linear_head_optimiser_and_structure_warmup_are_the_structure_codes():
    """nn.Linear(D, E) on raw features; AdamW betas (0.9, 0.95), lr 1e-3 replaced by a 100-iteration LR finder, weight
    decay 1e-4, periodic cosine (T_max 50 epochs), each parameter tensor's gradient clipped to norm 1.0 on its own;
    lambda(step) = structure_weight * min(1, step / 1000), step counted from 0 (their CLIPLoss.step())."""
    from pipe_align.align.base import StepContext

    for cfg in (LinearConfig(), MLPConfig()):
        assert (cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2) == (1e-3, 1e-4, 0.9, 0.95)
        assert (cfg.schedule, cfg.cycle_epochs, cfg.warmup_epochs) == ("cosine_cycle", 50, 0)  # CosineAnnealingLR
        assert (cfg.grad_clip, cfg.grad_clip_mode, cfg.structure_warmup_steps) == (1.0, "per_group", 1000)
        assert (cfg.lr_finder, cfg.lr_finder_start, cfg.lr_finder_end) == (100, 1e-7, 10)
    train, _, (xt, _) = contrastive_data()
    al, _ = fit(LinearHeads, LinearConfig(dim=16), train, epochs=2, batch_size=128)
    w, b = al.state_dict()["img.weight"].double(), al.state_dict()["img.bias"].double()
    raw = xt.double() * 3.0
    torch.testing.assert_close(
        al.image_global(ImageRows(cls=raw.float())).double(),
        torch.nn.functional.normalize(raw @ w.T + b, dim=1),
        atol=1e-5,
        rtol=1e-5,
    )
    assert [[tuple(p.shape) for p in g] for g in al.param_groups()] == [[(16, 32)], [(16,)], [(16, 24)], [(16,)]]
    batch = next(iter(train.batches(0, 64, 0)))
    heads = LinearHeads(LinearConfig(dim=16, structure_weight=10.0))
    heads.setup(TrainingData(train), 0)
    for step in (0, 1, 250, 999, 1000, 5000):
        total, parts = heads.loss(batch, StepContext(0, step, 4, lambda t, sizes: t))
        lam = 10.0 * min(1.0, step / 1000)
        assert parts["structure"] > 0
        assert float(total.detach()) == pytest.approx(parts["info_nce"] + lam * parts["structure"], rel=1e-6, abs=1e-7)


class AuthorsStructureWeight:
    """The STRUCTURE weight as the PAL authors' CLIPLoss holds it (src/training/loss/clip_loss.py:161-218): it starts
    at the full `structure_lambda`; `step()` sets lambda * min(1, train_step / warmup_steps) and then increments
    train_step. Their trainer calls step() once before each training step's forward (alignment_trainer.py:1635), never
    in the LR finder (base_trainer.py:147-232) nor in validation (alignment_trainer.py:1839-1895), which calls the same
    loss, so its value includes the weight of the moment times the regulariser."""

    def __init__(self, base: float, warmup: int) -> None:
        self.base, self.warmup, self.train_step, self.value = base, warmup, 0, base

    def step(self) -> None:
        self.value = self.base * min(1.0, self.train_step / self.warmup)
        self.train_step += 1


def test_structure_weight_in_the_lr_finder_and_the_heldout_loss_are_the_authors():
    from pipe_align.align.base import StepContext
    from pipe_align.align.loop import heldout_loss
    from pipe_align.align.losses import info_nce

    train, val, _ = contrastive_data()
    heads = LinearHeads(LinearConfig(dim=16, structure_weight=10.0, structure_warmup_steps=4))
    heads.setup(TrainingData(train), 0)
    same = lambda t, sizes: t  # noqa: E731
    batch = next(iter(train.batches(0, 64, 0)))
    total, parts = heads.loss(batch, StepContext(0, 0, 4, same, finder=True))  # before any step(): the full weight
    assert float(total.detach()) == pytest.approx(parts["info_nce"] + 10.0 * parts["structure"], rel=1e-6)
    for steps_done in (0, 1, 2, 3, 5, 40):
        authors = AuthorsStructureWeight(10.0, 4)
        for _ in range(steps_done):
            authors.step()
        want, n = 0.0, 0
        for b in val.batches(0, 32, 0, shuffle=False):
            reg = heads.loss(b, StepContext(0, 0, 4, same, finder=True))[1]["structure"]
            nce = info_nce(heads.image_global(b.image), heads.text_global(b.text), heads.val_temperature).item()
            want, n = want + (nce + authors.value * reg) * len(b.rows), n + len(b.rows)
        got = heldout_loss(heads, val, 32, 0, steps_done)["val_loss"]
        assert got == pytest.approx(want / n, rel=1e-5), steps_done
    plain = heldout_loss(heads, val, 32, 0)["val_loss"]  # no step count given: InfoNCE alone (selection probes)
    assert plain < heldout_loss(heads, val, 32, 0, 0)["val_loss"]


# -- the demo's semi-supervised stores ---------------------------------------------------------------------------------
def test_semi_unpaired_stores_are_the_other_rows_disjoint_and_shuffled(tmp_path):
    """pipelines/demo_semi.py: the unpaired stores hold every image after the first n pairs and exactly the captions
    of those images (none of a paired image), each in its own shuffle, rows intact, caption links cut."""
    from pipe_align.extract.store import StoreLayout, create_store, open_store
    from pipe_align.pipelines.demo_semi import _write_unpaired

    n_img, per, n_pairs = 30, 3, 8
    enc = {"alias": "fake", "layer": None}
    arrays = {
        "image": {
            "ids": np.array([f"im{i}" for i in range(n_img)]),
            "cls": np.arange(n_img * 4).reshape(n_img, 4),
            "patches": np.arange(n_img * 8).reshape(n_img, 2, 4),
            "labels": np.full(n_img, -1),
        },
        "text": {
            "ids": np.array([f"c{i}" for i in range(n_img * per)]),
            "text": np.array([f"t{i}" for i in range(n_img * per)]),
            "item": np.repeat(np.arange(n_img), per),
            "tokens": np.zeros((n_img * per, 2, 4)),
            "length": np.full(n_img * per, 2),
            "pooled": np.arange(n_img * per * 4).reshape(-1, 4),
        },
    }
    stores = {}
    for modality, arr in arrays.items():
        n = len(arr["ids"])
        lay = StoreLayout(
            modality=modality,
            encoder=enc | {"dim": 4},
            dataset="world",
            split="train",
            count=n,
            tokens=2,
            dim=4,
            rows_per_chunk=4,
            rows_per_shard=8,
            grid=(1, 2) if modality == "image" else None,
        )
        st = create_store(tmp_path / "train" / f"{modality}.zarr", lay)
        for s in range(lay.num_shards):
            a, b = lay.shard_range(s)
            st.write_shard(s, {k: np.asarray(v)[a:b] for k, v in arr.items()}, np.zeros(b - a, bool))
        st.finalize()
        stores[modality] = open_store(st.path)
    _write_unpaired(stores["image"], stores["text"], n_pairs, tmp_path / "unpaired")
    img, txt = open_store(tmp_path / "unpaired" / "image.zarr"), open_store(tmp_path / "unpaired" / "text.zarr")
    img_ids = [int(s[2:]) for s in img.read("ids")]
    cap_ids = [int(s[1:]) for s in txt.read("ids")]
    assert sorted(img_ids) == list(range(n_pairs, n_img)) and img_ids != sorted(img_ids)
    assert sorted(cap_ids) == list(range(n_pairs * per, n_img * per)) and cap_ids != sorted(cap_ids)
    np.testing.assert_array_equal(img.read("cls"), arrays["image"]["cls"][img_ids])
    np.testing.assert_array_equal(img.read("patches"), arrays["image"]["patches"][img_ids])
    np.testing.assert_array_equal(txt.read("pooled"), arrays["text"]["pooled"][cap_ids])
    assert (txt.read("item") == -1).all()


@pytest.mark.parametrize("method", ["linear", "mlp"])
def test_a_head_saved_before_the_authors_definitions_loads_as_it_was_trained(method, tmp_path):
    """A method.json from before 2026-11-30 (no normalize_inputs; center and a GELU mlp were then the only behaviour)
    loads with those definitions, not with today's defaults."""
    import json

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 12, generator=gen) * 5, torch.randn(60, 10, generator=gen)
    cls = get_method(method)
    former = {"normalize_inputs": True, "center": True} | ({"head": "gelu", "hidden": 8} if method == "mlp" else {})
    al, _ = fit(cls, cls.Config(dim=6, **former), FakePairs(x, y), epochs=2, batch_size=32)
    al.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "method.json").read_text())
    meta["config"] = {
        k: v
        for k, v in meta["config"].items()
        if k not in ("normalize_inputs", "head", "rank", "dropout", "gate_init", "structure_warmup_steps")
    } | {"structure_warmup": 5.0}
    (tmp_path / "run" / "method.json").write_text(json.dumps(meta))
    back = load_aligner(tmp_path / "run")
    assert back.config.normalize_inputs and back.config.center
    assert torch.equal(back.image_global(ImageRows(cls=x)), al.image_global(ImageRows(cls=x)))
    assert torch.equal(back.text_global(TextRows(pooled=y)), al.text_global(TextRows(pooled=y)))


@pytest.mark.parametrize("tokens", [False, True])
def test_dropout_masks_of_rank_parts_are_the_whole_batch_masks(tokens):
    """Under data parallelism each rank holds a part of the batch: its dropout masks must be the rows of the masks one
    process draws for the whole batch, or two ranks train other weights than one process."""
    from pipe_align.align.contrastive import ResLowRankHead

    torch.manual_seed(0)
    head = ResLowRankHead(6, 5, 3, 0.5, 0.25)
    with torch.no_grad():
        head.W2.weight.normal_()  # zero at init (the residual starts off): give the masks something to change
    z = torch.randn(10, 4, 6) if tokens else torch.randn(10, 6)

    def gen():
        return torch.Generator().manual_seed(1234)

    whole = head(z, gen())
    lo, hi, sizes = part_bounds(10, (1, 3))  # rank 1 of 3: rows 4..6 of the batch
    parts = [head(z[a:b], gen(), (a, 10)) for a, b in ((0, lo), (lo, hi), (hi, 10))]
    assert sizes == (4, 3, 3)
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(head(z[lo:hi], gen()), whole[lo:hi])  # a part drawn on its own gets other masks
