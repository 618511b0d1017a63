"""The feature store on its own: layout, create/reopen rules, shard writes, verify, dask views."""

import json

import numpy as np
import pytest

from pipe_align.extract.errors import PipeError
from pipe_align.extract.store import SCHEMA, StoreLayout, create_store, default_rows, open_store, store_path

ENC = {"alias": "tiny", "model_id": "/tmp/tiny", "modality": "image", "dim": 8, "layer": "last"}


def layout(count=10, per_shard=4, modality="image", **kw) -> StoreLayout:
    return StoreLayout(
        modality=modality,
        encoder=ENC | {"modality": modality},
        dataset="world",
        split="train",
        count=count,
        tokens=6,
        dim=8,
        rows_per_chunk=2,
        rows_per_shard=per_shard,
        grid=(2, 3) if modality == "image" else None,
        **kw,
    )


def fill_image_shard(store, shard, rng, skipped=None):
    start, stop = store.layout.shard_range(shard)
    n = stop - start
    rows = {
        "ids": np.array([f"img{i}" for i in range(start, stop)]),
        "cls": rng.standard_normal((n, 8)).astype(np.float16),
        "patches": rng.standard_normal((n, 6, 8)).astype(np.float16),
        "labels": np.arange(start, stop, dtype=np.int32),
    }
    store.write_shard(shard, rows, np.zeros(n, bool) if skipped is None else skipped)
    return rows


def test_layout_round_trip_and_shards():
    lay = layout()
    assert lay.num_shards == 3 and lay.shard_range(2) == (8, 10)
    assert StoreLayout.from_attrs(json.loads(json.dumps(lay.to_attrs()))) == lay


def test_default_rows_tile_and_sizes():
    chunk, shard = default_rows(tokens=256, dim=384, count=100_000)
    row = 256 * 384 * 2
    assert 1 << 20 <= chunk * row <= 8 << 20 and shard % chunk == 0 and 100 << 20 <= shard * row <= 512 << 20
    chunk, shard = default_rows(tokens=256, dim=384, count=10, shard_rows=6)
    assert shard == 6 and shard % chunk == 0
    chunk, shard = default_rows(tokens=4, dim=4, count=30)  # a small store is a single shard
    assert shard >= 30
    with pytest.raises(PipeError, match="shard-rows"):
        default_rows(4, 4, 10, shard_rows=0)


def test_write_resume_finalize_and_verify(tmp_path):
    rng = np.random.default_rng(0)
    path = store_path(tmp_path, "world", "train", "hf:/some/model")
    assert path.name == "hf---some--model.zarr"
    store = create_store(path, layout())
    assert store.pending_shards() == [0, 1, 2] and not store.complete
    written = fill_image_shard(store, 1, rng)
    reopened = create_store(path, layout())  # same layout: reopen to resume
    assert reopened.pending_shards() == [0, 2]
    with pytest.raises(PipeError, match="not done"):
        reopened.finalize()
    with pytest.raises(PipeError, match="incomplete"):
        open_store(path)
    skipped = np.array([False, True])
    fill_image_shard(reopened, 0, rng)
    fill_image_shard(reopened, 2, rng, skipped=skipped)
    reopened.finalize()
    st = open_store(path, modality="image", encoder="tiny")
    assert st.complete and st.attrs["skipped"] == ["img9"] and st.attrs["schema"] == SCHEMA
    np.testing.assert_array_equal(st["patches"][4:8], written["patches"])
    assert st.rows("cls", 4, 8).dtype.is_floating_point
    assert st.verify() == []
    assert st.info()["bytes_on_disk"] > 0 and st.info()["done_rows"] == 10


def test_verify_finds_nan_and_missing_rows(tmp_path):
    rng = np.random.default_rng(1)
    store = create_store(tmp_path / "s.zarr", layout(count=8))
    fill_image_shard(store, 0, rng)
    problems = store.verify()  # shard 1 never written: its rows are not done (their content is not checked)
    assert any("not done" in p and "row 4" in p for p in problems) and any("not marked complete" in p for p in problems)
    rows = fill_image_shard(store, 1, rng)
    store.finalize()
    assert store.verify() == []
    bad = rows["patches"].copy()
    bad[1, 2, 3] = np.inf
    store["patches"][4:8] = bad
    assert any("non-finite" in p and "row 5" in p for p in store.verify())


def test_other_layout_schema_or_file_is_an_error(tmp_path):
    create_store(tmp_path / "s.zarr", layout())
    with pytest.raises(PipeError, match="differs in count"):
        create_store(tmp_path / "s.zarr", layout(count=11))
    st = open_store(tmp_path / "s.zarr", require_complete=False)
    st.group.attrs["schema"] = "pipe.features/0"
    with pytest.raises(PipeError, match="schema"):
        open_store(tmp_path / "s.zarr", require_complete=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PipeError, match="is a file"):
        create_store(tmp_path / "file" / "world" / "s.zarr", layout())
    with pytest.raises(PipeError, match="no feature store"):
        open_store(tmp_path / "nothing.zarr")
    create_store(tmp_path / "t.zarr", layout())
    with pytest.raises(PipeError, match="written by encoder 'tiny'"):
        open_store(tmp_path / "t.zarr", require_complete=False, encoder="other")


def test_dask_view_uses_shard_blocks(tmp_path):
    rng = np.random.default_rng(2)
    store = create_store(tmp_path / "s.zarr", layout())
    parts = [fill_image_shard(store, s, rng)["patches"] for s in range(3)]
    store.finalize()
    view = open_store(tmp_path / "s.zarr").to_dask("patches")
    assert view.chunks[0] == (4, 4, 2)  # one block per shard, not per inner chunk
    np.testing.assert_array_equal(view.compute(), np.concatenate(parts))
    expected = np.concatenate(parts).astype(np.float32).mean()
    np.testing.assert_allclose(float(view.astype(np.float32).mean().compute()), expected, rtol=1e-5)


def test_bfloat16_round_trip(tmp_path):
    import torch

    lay = layout(count=4, dtype="bfloat16")
    store = create_store(tmp_path / "b.zarr", lay)
    x = torch.randn(4, 6, 8)
    bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    store.write_shard(0, {"ids": np.array(list("abcd")), "patches": bits}, np.zeros(4, bool))
    np.testing.assert_array_equal(store.rows("patches").float().numpy(), x.to(torch.bfloat16).float().numpy())


def test_verify_sees_nan_in_bfloat16_stores(tmp_path):
    import torch

    store = create_store(tmp_path / "b.zarr", layout(count=4, dtype="bfloat16"))
    x = torch.randn(4, 6, 8)
    x[2, 1, 1] = float("nan")
    bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    cls = torch.randn(4, 8).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    store.write_shard(0, {"ids": np.array(list("abcd")), "patches": bits, "cls": cls}, np.zeros(4, bool))
    store.finalize()
    assert any("non-finite" in p and "row 2" in p for p in store.verify())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_non_finite_rows_reads_the_bits_like_isfinite(dtype):
    """The bit test behind every finiteness check equals np.isfinite on the decoded values, extremes included."""
    import torch

    from pipe_align.extract.integrity import non_finite_rows

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((64, 5, 7)).astype(np.float32)) * 1e3
    specials = [float("nan"), float("inf"), -float("inf"), 65504.0, -65504.0, 6e-8, -0.0, 3e38]
    for i in range(48):
        x.view(-1)[int(rng.integers(x.numel()))] = specials[i % len(specials)]
    stored = x.to(torch.float16 if dtype == "float16" else torch.bfloat16)
    block = stored.numpy() if dtype == "float16" else stored.view(torch.int16).numpy().view(np.uint16)
    reference = ~np.isfinite(stored.float().numpy().reshape(64, -1)).all(axis=1)
    assert 0 < reference.sum() < 64
    np.testing.assert_array_equal(non_finite_rows(block, dtype), reference)
