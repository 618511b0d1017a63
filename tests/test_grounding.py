"""Phrase grounding: the Flickr30k Entities reader (strict markup), phrase spans in the caption store, the world's
phrase markup and boxes, and `pipe eval grounding` (pointing game) end to end on tiny models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipe_align.evaluate.grounding import box_mask, grounding_metrics, point_of
from pipe_align.extract.datasets import World, get_dataset, write_world
from pipe_align.extract.datasets.flickr30k_entities import parse_sentence
from pipe_align.extract.errors import PipeError
from pipe_align.extract.phrases import kept_positions, read_phrases, token_span
from pipe_align.extract.store import open_store, store_path
from pipe_align.pipelines.cli import main

SENTENCE = "[/EN#18/people A young man] in [/EN#19/clothing/other an orange hat] holds [/EN#0/notvisual it] ."
XML = """<annotation>
  <filename>{id}.jpg</filename>
  <size>
    <width>40</width>
    <height>30</height>
    <depth>3</depth>
  </size>
  <object>
    <name>18</name>
    <bndbox>
      <xmin>1</xmin>
      <ymin>1</ymin>
      <xmax>{xmax}</xmax>
      <ymax>20</ymax>
    </bndbox>
  </object>
  <object>
    <name>19</name>
    <nobndbox>1</nobndbox>
  </object>
</annotation>
"""


def write_f30k(root: Path, sentence: str = SENTENCE, xmax: int = 10) -> Path:
    """A one-image Flickr30k Entities folder written by hand in the release's layout."""
    from PIL import Image

    base = root / "flickr30k_entities"
    (base / "Sentences").mkdir(parents=True)
    (base / "Annotations").mkdir()
    (root / "flickr30k-images").mkdir()
    Image.new("RGB", (40, 30)).save(root / "flickr30k-images" / "123.jpg")
    (base / "Sentences" / "123.txt").write_text(f"{SENTENCE}\n{sentence}\n")
    (base / "Annotations" / "123.xml").write_text(XML.format(id="123", xmax=xmax))
    (base / "test.txt").write_text("123\n")
    return root


def test_parse_sentence_as_the_release_defines_the_markup():
    text, phrases = parse_sentence(SENTENCE, "f:1")
    assert text == "A young man in an orange hat holds it ."
    # spans written down by hand from the plain text above
    assert [(text[a:b], e, t) for a, b, e, t in phrases] == [
        ("A young man", 18, ("people",)),
        ("an orange hat", 19, ("clothing", "other")),
        ("it", 0, ("notvisual",)),
    ]


def test_reader_keeps_phrases_and_boxes_in_zero_based_half_open_pixels(tmp_path):
    ds = get_dataset("flickr30k-entities", write_f30k(tmp_path), "test")
    caps = ds.captions()
    assert [c.id for c in caps] == ["123#0", "123#1"]
    # entity 0 (not visual) is not marked; 18 and 19 are
    assert [(caps[0].text[p.start : p.stop], p.entity) for p in caps[0].phrases] == [
        ("A young man", 18),
        ("an orange hat", 19),
    ]
    g = ds.load_boxes(0)
    assert (g.width, g.height) == (40, 30)
    assert g.entities[18].boxes == ((0.0, 0.0, 10.0, 20.0),)  # xmin 1..xmax 10 inclusive, 1-based
    assert g.entities[19].boxes == () and g.entities[19].types == ("clothing", "other")


@pytest.mark.parametrize(
    "sentence, fragment",
    [
        ("[/EN#18/people A man in a hat .", "never closed"),
        ("A man] in a hat .", "']' without an open phrase"),
        ("[/EN#18/people A [/EN#19/clothing man] .", "'[' inside an open phrase"),
        ("[/EN#77/people A man] .", "entity 77 has no entry"),
        ("[EN18 A man] .", "malformed phrase tag"),
    ],
)
def test_strict_markup_names_file_and_line(tmp_path, capsys, sentence, fragment):
    root = write_f30k(tmp_path, sentence=sentence)
    with pytest.raises(PipeError, match=re.escape(fragment)) as e:
        get_dataset("flickr30k-entities", root, "test")
    assert str(e.value).startswith(str(root / "flickr30k_entities" / "Sentences" / "123.txt") + ":2:")
    rc = main(
        [
            "extract",
            "--encoder",
            "minilm",
            "--dataset",
            "flickr30k-entities",
            "--root",
            str(root),
            "--split",
            "test",
            "--features",
            str(tmp_path / "f"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and fragment in err and "\n" not in err


def test_box_outside_the_image_names_file_and_line(tmp_path):
    root = write_f30k(tmp_path, xmax=41)  # the image is 40 px wide; <bndbox> opens on line 10 of XML
    with pytest.raises(PipeError, match=r"123\.xml:10: box of entity 18 .* outside the 40x30 image"):
        get_dataset("flickr30k-entities", root, "test")


def test_world_captions_mark_every_object_and_boxes_come_from_the_masks():
    w = World(None, "train", size=12)
    for i, scene in enumerate(w.scenes()):
        g = w.load_boxes(i)
        mask = w.render(i)[1]
        for k, obj in enumerate(scene.objects):
            ys, xs = np.nonzero(mask == w.classes.index(obj.cls))
            assert g.entities[k + 1].boxes == ((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),)
            assert g.entities[k + 1].types == (obj.cls,)
    for c in w.captions():
        names = [o.cls for o in w.scenes()[c.item].objects]
        said = [n for n in names if n in c.text.lower().replace(".", "").split()]
        assert sorted(names[p.entity - 1] for p in c.phrases) == sorted(said)  # every object named is marked
        for p in c.phrases:
            phrase = c.text[p.start : p.stop].lower()
            assert phrase.split()[0] in ("a", "an", "the") and phrase.split()[-1] == names[p.entity - 1]


def test_token_spans_follow_the_stored_tokens_with_and_without_specials(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    text = "a red ball on a grassy field"
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets, special = [tuple(o) for o in enc["offset_mapping"]], enc["special_tokens_mask"]
    n_word = len(tok.tokenize(text))
    n_phrase = len(tok.tokenize("a red ball"))  # the phrase's word pieces, counted on their own
    kept = kept_positions(offsets, special, n_word + 2, None)  # stored with [CLS] and [SEP]
    assert token_span(offsets, kept, 0, 10) == (1, 1 + n_phrase)
    dropped = kept_positions(offsets, special, n_word, None)
    assert token_span(offsets, dropped, 0, 10) == (0, n_phrase)
    last = len(tok.tokenize("grassy field"))
    assert token_span(offsets, dropped, 16, 28) == (n_word - last, n_word)
    assert token_span(offsets, dropped[:2], 16, 28) is None  # truncated away


def bilinear_reference(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling written out: output pixel centre (x + 0.5) * w / W - 0.5 in the input grid, clamped."""
    h, w = heat.shape
    out = np.zeros((height, width))
    for y in range(height):
        sy = min(max((y + 0.5) * h / height - 0.5, 0), h - 1)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = min(max((x + 0.5) * w / width - 0.5, 0), w - 1)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = heat[y0, x0] * (1 - fx) + heat[y0, x1] * fx
            bottom = heat[y1, x0] * (1 - fx) + heat[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def test_pointing_game_against_an_independent_definition():
    """A hit when the maximum of the heat map, upsampled to the image, lies in a box of the phrase (Zhang et al. 2016
    without their 15 px tolerance, as grounding papers use it); chance = the boxes' share of the image."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w, height, width = 4, 5, int(rng.integers(20, 40)), int(rng.integers(20, 40))
        heat = rng.standard_normal((h, w))
        ref = bilinear_reference(heat, height, width)
        y, x = point_of(torch.from_numpy(heat), height, width)
        assert ref[y, x] == pytest.approx(ref.max(), abs=1e-5)
        boxes = tuple(
            (
                float(rng.integers(0, width // 2)),
                float(rng.integers(0, height // 2)),
                float(rng.integers(width // 2 + 1, width + 1)),
                float(rng.integers(height // 2 + 1, height + 1)),
            )
            for _ in range(2)
        )
        inside = np.array(
            [
                [any(x0 <= xx < x1 and y0 <= yy < y1 for x0, y0, x1, y1 in boxes) for xx in range(width)]
                for yy in range(height)
            ]
        )
        assert (box_mask(boxes, height, width) == inside).all()
    m = grounding_metrics(
        {"tokens": [True, False, True], "phrase": [False, False, True]},
        [0.5, 0.25, 0.0],
        [("people",), ("people", "clothing"), ("clothing",)],
    )
    assert m["pointing_acc"] == pytest.approx(2 / 3) and m["pointing_acc/phrase"] == pytest.approx(1 / 3)
    assert m["chance"] == pytest.approx(0.25) and m["pointing_acc/type/people"] == pytest.approx(0.5)
    assert m["pointing_acc/type/clothing"] == pytest.approx(0.5) and m["phrases/type/clothing"] == 2


def test_eval_grounding_end_to_end_on_a_world_in_the_flickr30k_entities_layout(tmp_path, tiny_dinov2, tiny_bert):
    """The issue's "Done when" path: extract, align, `pipe eval grounding` for PAL and a baseline."""
    root, feats = tmp_path / "data", tmp_path / "features"
    for split, size in (("train", 16), ("test", 6)):
        write_world(root, split, size=size, layouts=("flickr30k-entities",))
    for split in ("train", "test"):
        for enc in (f"hf:{tiny_dinov2}", f"hf:{tiny_bert}"):
            assert (
                main(
                    [
                        "extract",
                        "--encoder",
                        enc,
                        "--dataset",
                        "flickr30k-entities",
                        "--root",
                        str(root),
                        "--split",
                        split,
                        "--features",
                        str(feats),
                        "--no-progress",
                    ]
                )
                == 0
            )
    caps = open_store(store_path(feats, "flickr30k-entities", "test", f"hf:{tiny_bert}"))
    table = read_phrases(caps)
    ds = get_dataset("flickr30k-entities", root, "test")
    assert len(table) == sum(len(c.phrases) for c in ds.captions())
    texts, length = caps.read("text"), caps.read("length")
    assert (table[:, 2] <= length[table[:, 0]]).all() and [str(t) for t in texts] == [c.text for c in ds.captions()]
    for method, extra in (("pal", ["--epochs", "1", "--anchors", "8", "--lr-finder", "0"]), ("procrustes", [])):
        run = tmp_path / "runs" / method
        assert (
            main(
                [
                    "align",
                    "--method",
                    method,
                    "--shards",
                    str(feats / "flickr30k-entities" / "train"),
                    "--out",
                    str(run),
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
                    "eval",
                    "grounding",
                    "--dataset",
                    "flickr30k-entities",
                    "--root",
                    str(root),
                    "--split",
                    "test",
                    "--features",
                    str(feats),
                    "--run",
                    str(run),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        res = json.loads((run / "eval" / "grounding-flickr30k-entities-test.json").read_text())
        assert 0 <= res["pointing_acc"] <= 1 and 0 < res["chance"] < 1 and res["phrases"] > 0
        assert ("pointing_acc/tokens" in res) == (method == "pal") and "pointing_acc/phrase" in res
        assert (run / "eval" / "figures" / "grounding-flickr30k-entities-test-heatmaps.png").is_file()
    # a damaged span table is a one-line error, not a result
    caps.group["phrases"][0, 2] = 999
    with pytest.raises(PipeError, match="array 'phrases' row 0 is not a span of its caption"):
        read_phrases(open_store(caps.path))
