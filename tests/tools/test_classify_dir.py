"""tools.classify_dir on generated folders with the tiny random-weight model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testing.models import ClipFiles
from tools import classify_dir
from tools.classify_dir import main, parse_mapping

CONFIG = {
    "classifier_configs": [
        {"name": "red", "examples_to_include": ["red"]},
        {"name": "blue", "examples_to_include": ["blue"], "examples_to_exclude": ["navy"]},
    ],
    "augment_examples": False,
}


def make_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = root / ("sub" if i % 2 else "") / f"img{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def model_args(tiny_clip: ClipFiles, tmp: Path) -> list[str]:
    return [
        "--model",
        str(tiny_clip.config),
        "--pretrained",
        str(tiny_clip.checkpoint),
        "--data-dir",
        str(tmp / "d"),
        "--quiet",
        "--batch-size",
        "4",
    ]


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_classify_csv_resume_and_bad_files(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    paths = make_folder(folder, 9)
    (folder / "notes.jpg").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    cfg = tmp_path / "clf.json"
    cfg.write_text(json.dumps(CONFIG))
    out = tmp_path / "out.csv"
    argv = ["classify", str(cfg), str(folder), "--out", str(out), *model_args(tiny_clip, tmp_path)]
    assert main(argv) == 0
    rows = read_csv(out)
    assert rows[0] == ["path", "pred", "red", "blue"]
    assert sorted(r[0] for r in rows[1:]) == sorted(str(p) for p in paths)
    for r in rows[1:]:
        assert r[1] in {"red", "blue"} and float(r[2]) + float(r[3]) == pytest.approx(1.0, abs=1e-4)
    errors = read_csv(out.with_name("out.csv.errors.csv"))
    assert sorted(Path(e[0]).name for e in errors[1:]) == ["empty.png", "notes.jpg"]

    assert main(argv) == 0  # resume: nothing new
    assert len(read_csv(out)) == len(rows)
    assert len(read_csv(out.with_name("out.csv.errors.csv"))) == len(errors)
    Image.new("RGB", (30, 30), (200, 0, 0)).save(folder / "new.png")
    assert main(argv) == 0
    again = read_csv(out)
    assert len(again) == len(rows) + 1 and again[-1][0] == str(folder / "new.png")


def test_knn_on_train_equals_val_is_perfect(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    for label, seed in (("a", 1), ("b", 2), ("c", 3)):
        make_folder(tmp_path / "data" / label, 3, seed)
    out = tmp_path / "knn"
    argv = ["knn", str(tmp_path / "data"), str(tmp_path / "data"), "--k", "1", "--out-dir", str(out)]
    assert main([*argv, *model_args(tiny_clip, tmp_path)]) == 0
    assert json.loads((out / "knn.json").read_text())["top1"] == 1.0
    Image.open(out / "confusion.png").verify()


def test_eval_writes_metrics_and_confusion(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    for label, seed in (("red", 1), ("blue", 2)):
        make_folder(tmp_path / "val" / label, 4, seed)
    cfg = tmp_path / "clf.json"
    cfg.write_text(json.dumps(CONFIG))
    out = tmp_path / "report"
    assert (
        main(
            [
                "eval",
                str(tmp_path / "val"),
                "--config",
                str(cfg),
                "--out-dir",
                str(out),
                *model_args(tiny_clip, tmp_path),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    # top-1 against the predictions `classify` writes for the same images (another path through the tool).
    preds = tmp_path / "preds.csv"
    argv = ["classify", str(cfg), str(tmp_path / "val"), "--out", str(preds), *model_args(tiny_clip, tmp_path)]
    assert main(argv) == 0
    right = [Path(r[0]).relative_to(tmp_path / "val").parts[0] == r[1] for r in read_csv(preds)[1:]]
    assert m["images"] == len(right) == 8 and m["top1"] == pytest.approx(sum(right) / 8)
    assert sum(map(sum, m["confusion"])) == 8
    assert set(m["per_class"]) == {"red", "blue"}
    assert "| red |" in (out / "metrics.md").read_text()
    img = Image.open(out / "confusion.png")
    assert img.format == "PNG" and img.size[0] > 50


def test_metrics_known_answer() -> None:
    m = classify_dir.metrics(["a", "a", "b", "c"], [["a", "b"], ["b", "a"], ["b", "a"], ["a", "c"]], ["a", "b", "c"])
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == 0.5 and m["per_class"]["c"]["recall"] == 0.0


def test_metrics_count_rejected_images_as_wrong() -> None:
    truth, ranked = ["a", "a", "b", "b"], [["a", "b"], ["a", "b"], ["b", "a"], ["a", "b"]]
    m = classify_dir.metrics(truth, ranked, ["a", "b"], [False, True, False, False])
    # Image 1 was right but rejected: wrong in top-1, a miss in a's recall, in no confusion cell; top-5 unchanged.
    assert m["top1"] == 0.5 and m["top5"] == 1.0 and m["rejected"] == 1
    assert m["top1_kept"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "support": 2, "rejected": 1}
    assert m["confusion"] == [[1, 0], [1, 1]]
    assert "rejected" not in classify_dir.metrics(truth, ranked, ["a", "b"])


def test_parse_mapping(tmp_path: Path) -> None:
    f = tmp_path / "map.txt"
    f.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n\n")
    specs = parse_mapping(f, "a photo of a {}.")
    assert [s.name for s in specs] == ["n01440764", "n01443537"]
    assert specs[0].examples_to_include == ["a photo of a tench.", "a photo of a Tinca tinca."]
    assert parse_mapping(f, None)[1].examples_to_include == ["goldfish", "Carassius auratus"]


def test_raw_columns_and_resume_after_a_cut_off_row(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    paths = make_folder(folder, 3)
    cfg = tmp_path / "clf.json"
    cfg.write_text(json.dumps(CONFIG))
    out = tmp_path / "raw.csv"
    argv = ["classify", str(cfg), str(folder), "--out", str(out), "--raw", *model_args(tiny_clip, tmp_path)]
    assert main(argv) == 0
    rows = read_csv(out)
    assert rows[0] == ["path", "pred", "red", "blue", "raw:red", "raw:blue"]
    for r in rows[1:]:
        raw = {"red": float(r[4]), "blue": float(r[5])}
        assert r[1] == max(raw, key=raw.__getitem__) and all(0.0 <= v <= 1.0 for v in raw.values())
    # A kill in the middle of writing the last row: that row is dropped and redone, the others stay.
    text = out.read_text()
    out.write_text(text[: len(text) - 5])
    assert main(argv) == 0
    again = read_csv(out)
    assert len(again) == len(rows) and sorted(r[0] for r in again[1:]) == sorted(str(p) for p in paths)
    assert all(len(r) == 6 for r in again)
    # Another set of columns into the same file is refused, not mixed in.
    with pytest.raises(SystemExit):
        main([a for a in argv if a != "--raw"])


def test_eval_refuses_folders_that_name_no_class(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    make_folder(tmp_path / "val" / "red", 1)
    make_folder(tmp_path / "val" / "green", 1)
    cfg = tmp_path / "clf.json"
    cfg.write_text(json.dumps(CONFIG))
    argv = ["eval", str(tmp_path / "val"), "--config", str(cfg), "--out-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="green"):
        main([*argv, *model_args(tiny_clip, tmp_path)])


def test_parse_mapping_first_name_only(tmp_path: Path) -> None:
    f = tmp_path / "map.txt"
    f.write_text("n01440764 tench, Tinca tinca\nn99 \n")
    specs = parse_mapping(f, "a photo of a {}.", "first")
    assert specs[0].examples_to_include == ["a photo of a tench."]
    assert specs[1].name == "n99" and specs[1].examples_to_include == ["a photo of a n99."]


def test_eval_from_a_mapping_file_with_the_template_ensemble(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    for label, seed in (("n001", 1), ("n002", 2)):
        make_folder(tmp_path / "val" / label, 2, seed)
    mapping = tmp_path / "map.txt"
    mapping.write_text("n001 red fish, crimson fish\nn002 blue fish\nn003 green fish\n")
    out = tmp_path / "r"
    argv = ["eval", str(tmp_path / "val"), "--mapping", str(mapping), "--augment", "--out-dir", str(out)]
    assert main([*argv, *model_args(tiny_clip, tmp_path)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["n001", "n002", "n003"] and m["images"] == 4
    assert m["per_class"]["n003"]["support"] == 0


SHAPES_MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-clip"


def test_eval_with_the_shapes_model_knows_colours(tmp_path: Path) -> None:
    """The project's trained toy CLIP names the colour of drawn shapes (100% measured; BENCHMARKS.md)."""
    config, weights = SHAPES_MODEL / "shapes-clip.json", SHAPES_MODEL / "shapes-clip.fp16.pt"
    from tools import shapes

    assert config.exists() and weights.exists(), "models/shapes-clip ships with the repository"
    rng = np.random.default_rng(7)
    colours = ["red", "blue", "yellow"]
    for colour in colours:
        (tmp_path / "val" / colour).mkdir(parents=True)
        for i, shape in enumerate(shapes.SHAPES):
            shapes.draw(colour, shape, rng).save(tmp_path / "val" / colour / f"{i}.png")
    cfg = tmp_path / "clf.json"
    classes = [{"name": c, "examples_to_include": [f"a {c} shape"]} for c in colours]
    cfg.write_text(json.dumps({"classifier_configs": classes, "augment_examples": False}))
    out = tmp_path / "report"
    argv = ["eval", str(tmp_path / "val"), "--config", str(cfg), "--out-dir", str(out), "--quiet"]
    assert main([*argv, "--model", str(config), "--pretrained", str(weights), "--data-dir", str(tmp_path / "d")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # Drawn with a fixed seed and scored by a fixed model, so the result is deterministic: every one right.
    assert m["images"] == 9 and m["top1"] == 1.0
    assert all(v["recall"] is not None for v in m["per_class"].values())
    # With the config's open set, eval applies it as /classify does: below the threshold an image is rejected (wrong).
    for threshold, n_rejected in ((0.0, 0), (1.0, 9)):
        body = {"classifier_configs": classes, "augment_examples": False, "open_set": {"threshold": threshold}}
        cfg.write_text(json.dumps(body))
        assert (
            main([*argv, "--model", str(config), "--pretrained", str(weights), "--data-dir", str(tmp_path / "d")]) == 0
        )
        m = json.loads((out / "metrics.json").read_text())
        assert m["rejected"] == n_rejected and m["top1"] == 1.0 - n_rejected / 9
        assert m["top1_kept"] == (1.0 if n_rejected < 9 else None)
        assert f"open set: {n_rejected} rejected" in (out / "metrics.md").read_text()


def test_eval_with_shots_from_a_train_folder(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    for label, seed in (("red", 1), ("blue", 2), ("green", 3)):
        make_folder(tmp_path / "data" / label, 3, seed)
    cfg = tmp_path / "clf.json"
    cfg.write_text(json.dumps(CONFIG))  # red and blue have texts; green only its images
    out = tmp_path / "r"
    data = str(tmp_path / "data")
    argv = ["eval", data, "--config", str(cfg), "--train", data, "--shots", "3", "--out-dir", str(out)]
    assert main([*argv, *model_args(tiny_clip, tmp_path)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["shots"] == 3 and m["classes"] == ["red", "blue", "green"] and m["images"] == 9
    # Images only, every image its own exemplar: each is nearest to itself (cos 1), so every one is right.
    argv = ["eval", data, "--train", data, "--shots", "3", "--out-dir", str(out)]
    assert main([*argv, *model_args(tiny_clip, tmp_path)]) == 0
    assert json.loads((out / "metrics.json").read_text())["top1"] == 1.0
    with pytest.raises(SystemExit, match="needs --config"):
        main(["eval", data, "--out-dir", str(out), *model_args(tiny_clip, tmp_path)])


def test_calibrate_picks_the_threshold_for_a_false_rejection_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the shapes model: classes named by colour; shapes in colours no class names are rejected."""
    from tools import shapes

    config, weights = SHAPES_MODEL / "shapes-clip.json", SHAPES_MODEL / "shapes-clip.fp16.pt"
    rng = np.random.default_rng(11)
    named, unnamed = ["red", "blue", "yellow", "green"], ["cyan", "pink", "grey"]
    for folder, colours, n in (("in", named, 5), ("out", unnamed, 4)):
        (tmp_path / folder).mkdir()
        for c in colours:
            for i in range(n):
                shapes.draw(c, shapes.SHAPES[i % 3], rng).save(tmp_path / folder / f"{c}{i}.png")
    cfg = tmp_path / "clf.json"
    classes = [{"name": c, "examples_to_include": [f"a {c} shape"]} for c in named]
    cfg.write_text(json.dumps({"classifier_configs": classes, "augment_examples": False}))
    written = tmp_path / "open.json"
    argv = ["calibrate", str(cfg), str(tmp_path / "in"), "--frr", "0.1", "--outside", str(tmp_path / "out")]
    argv += ["--write", str(written), "--quiet"]
    assert main([*argv, "--model", str(config), "--pretrained", str(weights), "--data-dir", str(tmp_path / "d")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["in_distribution_images"] == 20 and out["outside_images"] == 12
    assert out["false_rejection_rate"] <= 0.1
    assert out["outside_rejection_rate"] >= 0.9, out
    body = classify_dir.load_config(written)
    assert body.open_set is not None and body.open_set.threshold == out["threshold"]
    assert body.open_set.label == "none of these"
