"""run_vit.py / validate_vit.py end to end on a tiny ViT (2 layers, hidden 64, 8 x 8 patches of 32 x 32 images)
and images the test draws itself (three classes in class folders): training, FP and W8A8 validation with every
figure, exact resume, the image targets and marks against hand computations, and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_language.data.images import ImageDataArgs, SeededImages, eval_transform, load_image_split
from transformers_language.errors import UsageError
from transformers_language.evaluation.probe_views import ImageInputs
from transformers_language.objectives.image_classification import MixTargets

from .conftest import assert_resume_repeats_run, read_log
from .test_vit_models import tiny_vit_config

TINY_YAML = """hidden_size: 64
num_hidden_layers: 2
num_attention_heads: 4
intermediate_size: 128
image_size: 32
patch_size: 8
"""
CLASSES = ("blobs", "horizontal", "vertical")
METHODS = {
    "vanilla": [],
    "clipped": ["--attn_softmax", "clipped(-0.01:1)"],
    "gated": ["--attn_gate_type", "conditional_per_token", "--attn_gate_init", "0.5"],
}


def draw(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 32 x 32 RGB image: stripes or blobs in the left half, a flat background on the right."""
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    grid = np.indices((32, 16)).astype(float)
    if kind == "horizontal":
        pattern = np.sin(grid[0] * rng.uniform(0.8, 1.2)) > 0
    elif kind == "vertical":
        pattern = np.sin(grid[1] * rng.uniform(0.8, 1.2)) > 0
    else:
        pattern = rng.random((32, 16)) > 0.5
    image[:, :16] = np.where(pattern[..., None], rng.integers(0, 80, 3), rng.integers(150, 255, 3))
    return image


def write_image_folders(root: Path, per_class: tuple[int, int] = (12, 4), classes=CLASSES) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    folders = []
    for split, count in zip(("train", "validation"), per_class, strict=True):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(draw(name, rng)).save(root / split / name / f"{index}.png")
        folders.append(root / split)
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> tuple[Path, Path]:
    return write_image_folders(tmp_path_factory.mktemp("images"))


def vit_train_argv(output_dir: Path, folders: tuple[Path, Path], *extra: str) -> list[str]:
    config = output_dir.parent / "vit-tiny.yaml"
    config.write_text(TINY_YAML)
    return [
        "--config_path", str(config),
        "--train_dir", str(folders[0]),
        "--validation_dir", str(folders[1]),
        "--image_size", "32",
        "--random_resized_crop_scale", "0.5", "1.0",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-3",
        "--max_train_steps", "4",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def vit_validate_argv(checkpoint: Path, folders: tuple[Path, Path], output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint),
        "--validation_dir", str(folders[1]),
        "--per_device_eval_batch_size", "8",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def run_vit(argv: list[str]) -> dict:
    import run_vit

    return run_vit.main(argv)


def validate_vit(argv: list[str]) -> dict:
    import validate_vit

    return validate_vit.main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folders) -> dict[str, Path]:
    """A tiny ViT per method, trained for a few steps with RandAugment, Mixup, CutMix and label smoothing."""
    root = tmp_path_factory.mktemp("vit_runs")
    recipe = ["--randaugment_num_ops", "2", "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0"]
    recipe += ["--label_smoothing", "0.1", "--with_tracking", "--report_to", "tensorboard", "--extra_tb_stats"]
    recipe += ["--tb_scalar_log_interval", "2"]
    for name, flags in METHODS.items():
        run_vit(vit_train_argv(root / name, image_folders, *recipe, *flags))
    return {name: root / name for name in METHODS}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_writes_a_model_that_reloads_as_itself(trained, method):
    out = trained[method]
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["accuracy"] <= results["top5_accuracy"] <= 1.0 and results["eval_images"] == 12
    assert math.isfinite(results["eval_loss"]) and results["step"] == 4
    log = read_log(out)
    assert len(log) == 4 and all(r["images_per_s"] > 0 and math.isfinite(r["loss"]) for r in log)
    config = json.loads((out / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(config["id2label"]))] == list(CLASSES)
    assert (out / "preprocessor_config.json").is_file()
    assert config["attention_variant"] == results["settings"]["attention"]
    growth = [json.loads(line) for line in (out / "growth.jsonl").read_text().splitlines()]
    assert [g["step"] for g in growth] == [2, 4] and len(growth[0]["sink_ratio"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fp_and_w8a8_validation_write_every_figure(trained, image_folders, method, tmp_path):
    checkpoint = trained[method]
    fp = validate_vit(vit_validate_argv(checkpoint, image_folders, tmp_path / "fp"))
    trained_results = json.loads((checkpoint / "all_results.json").read_text())
    assert fp["accuracy"] == pytest.approx(trained_results["accuracy"])  # the same images, the same model
    for key in ("max_inf_norm", "max_ffn_inf_norm", "max_layer_inf_norm", "avg_kurtosis", "max_kurtosis"):
        assert math.isfinite(fp[key]) and fp[key] > 0
    assert set(fp["attention"]) == {"layer_0", "layer_1"}
    for figures in fp["attention"].values():
        assert {"first_token_mass", "sink_ratio", "background_mass"} <= set(figures)
        assert all(0.0 <= v <= 1.0 for v in figures["first_token_mass"] + figures["background_mass"])
        assert ("exact_zero_fraction" in figures) == (method == "clipped")
        assert ("gate_mean" in figures) == (method == "gated")
    names = {t["token"] for record in fp["activations"].values() for t in record["top_tokens"]}
    assert names and all(name == "[CLS]" or name.startswith("patch (") for name in names)
    settings = json.loads((tmp_path / "fp" / "all_results.json").read_text())["settings"]
    assert settings["background_patches"].startswith("the 25% lowest-variance patches")

    w8a8 = validate_vit(
        vit_validate_argv(
            checkpoint, image_folders, tmp_path / "w8a8", "--quantize", "--train_dir", str(image_folders[0])
        )
    )
    quantization = json.loads((tmp_path / "w8a8" / "all_results.json").read_text())["settings"]["quantization"]
    assert quantization["calibration_split"] == "train" and quantization["points"]
    assert 0.0 <= w8a8["accuracy"] <= 1.0 and math.isfinite(w8a8["eval_loss"])
    assert w8a8["eval_loss"] != fp["eval_loss"]  # the quantizers changed the numbers


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(tmp_path, image_folders, monkeypatch):
    """Seeded augmentation, Mixup / CutMix and label smoothing: a resumed run repeats the straight one."""

    def train(output_dir, *flags):
        return run_vit(vit_train_argv(output_dir, image_folders, *flags))

    extra = ["--checkpointing_steps", "3", "--randaugment_num_ops", "2", "--mixup_alpha", "0.8"]
    extra += ["--cutmix_alpha", "1.0", "--label_smoothing", "0.1", "--hidden_dropout", "0.1"]
    extra += ["--dataloader_num_workers", "2"]
    assert_resume_repeats_run(train, tmp_path, monkeypatch, *extra)


def test_mix_targets_mix_pixels_and_labels_with_one_weight():
    generator = torch.Generator().manual_seed(3)
    pixels = torch.rand(6, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mixup = MixTargets(3, label_smoothing=0.1, mixup_alpha=0.8)
    mixed, soft = mixup({"pixel_values": pixels, "labels": labels}, torch.Generator().manual_seed(7))
    smooth = torch.nn.functional.one_hot(labels, 3).float() * 0.9 + 0.1 / 3
    # Mixup: x_i' = lam x_i + (1 - lam) x_{i-1}, one lam for the batch; the labels mix with the same lam.
    rolled = pixels.roll(1, 0)
    lam = ((mixed - rolled) / (pixels - rolled)).flatten()[0]
    torch.testing.assert_close(mixed, lam * pixels + (1 - lam) * rolled)
    torch.testing.assert_close(soft, lam * smooth + (1 - lam) * smooth.roll(1, 0))
    again, _ = mixup({"pixel_values": pixels, "labels": labels}, torch.Generator().manual_seed(7))
    assert torch.equal(again, mixed)  # a function of the step's generator
    plain_pixels, plain = MixTargets(3)({"pixel_values": pixels, "labels": labels}, torch.Generator())
    assert plain_pixels is pixels and torch.equal(plain, torch.nn.functional.one_hot(labels, 3).float())
    cut, cut_soft = MixTargets(3, cutmix_alpha=1.0)({"pixel_values": pixels, "labels": labels}, generator)
    pasted = (cut == rolled).all(dim=1).float().mean(dim=(1, 2))  # share of each image taken from its neighbour
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    torch.testing.assert_close(cut_soft, (1 - pasted[:, None]) * onehot + pasted[:, None] * onehot.roll(1, 0))


def test_marks_are_cls_and_the_flattest_patches():
    config = tiny_vit_config()  # 4 x 4 patches of 8 x 8 pixels
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pixels[0, :, 8:16, 16:24] = 0.3  # patch (1, 2): flat
    pixels[1, :, 24:32, 0:8] *= 0.01  # patch (3, 0): nearly flat
    inputs = ImageInputs(None, config)
    marks = inputs.marks(pixels)
    assert marks.shape == (2, 17, 2) and marks[:, 0, 0].tolist() == [1.0, 1.0] and marks[:, 1:, 0].sum() == 0
    assert marks[:, :, 1].sum(dim=1).tolist() == [4.0, 4.0] and marks[:, 0, 1].sum() == 0  # 25% of 16 patches
    assert marks[0, 1 + 1 * 4 + 2, 1] == 1.0 and marks[1, 1 + 3 * 4 + 0, 1] == 1.0
    variance = inputs.patch_variance(pixels)
    expected = torch.stack(
        [pixels[:, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].flatten(1) for r in range(4) for c in range(4)], 1
    )
    torch.testing.assert_close(variance, expected.var(dim=2, unbiased=False))
    assert inputs.token_ids(pixels).tolist() == [list(range(17))] * 2
    assert [inputs.token_name(i) for i in (0, 1, 7, 16)] == ["[CLS]", "patch (0, 0)", "patch (1, 2)", "patch (3, 3)"]


def test_training_images_are_a_function_of_their_seed(image_folders):
    dataset = load_image_split(ImageDataArgs(train_dir=str(image_folders[0])), "train")
    assert dataset.features["label"].names == list(CLASSES) and len(dataset) == 36
    from transformers_language.data.images import AugmentationArgs, train_transform

    images = SeededImages(dataset, train_transform(32, [0.5] * 3, [0.5] * 3, AugmentationArgs(randaugment_num_ops=2)))
    first, again, other = images[(5, 11)], images[(5, 11)], images[(5, 12)]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["labels"] == dataset[5]["label"]
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    evaluation = eval_transform(32, [0.5] * 3, [0.5] * 3, 1.0)(dataset[5]["image"])
    reference = torch.from_numpy(np.array(dataset[5]["image"].convert("RGB"))).permute(2, 0, 1) / 255.0
    torch.testing.assert_close(evaluation, (reference - 0.5) / 0.5)  # 32 x 32 in, crop fraction 1: unchanged


def test_bad_input_gets_one_clear_line(tmp_path, image_folders):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="both choose the images"):
        run_vit(vit_train_argv(out, image_folders, "--dataset_name", "uoft-cs/cifar10"))
    with pytest.raises(UsageError, match="not a multiple of the patch size 8"):
        run_vit(vit_train_argv(out, image_folders, "--image_size", "36"))
    missing = (tmp_path / "nothing", image_folders[1])
    with pytest.raises(Exception, match="is not a folder"):
        run_vit(vit_train_argv(out, missing))
    fewer = write_image_folders(tmp_path / "fewer", (1, 1), classes=CLASSES[:2])
    with pytest.raises(UsageError, match="hold different classes \\(vertical only in one\\)"):
        run_vit(vit_train_argv(out, (image_folders[0], fewer[1])))
    with pytest.raises(SystemExit):  # a language-model flag run_vit.py does not take
        run_vit(vit_train_argv(out, image_folders, "--tokenizer_name", "x"))


@pytest.mark.slow
def test_validation_refuses_data_with_other_classes(trained, tmp_path):
    other = write_image_folders(tmp_path / "other", (1, 2), classes=("ants", "bees", "cats", "dogs"))
    with pytest.raises(UsageError, match=r"classifies 3 classes .* but the data has 4"):
        validate_vit(vit_validate_argv(trained["vanilla"], other, tmp_path / "eval"))


def test_alpha_and_sigmoid_read_the_token_count(tmp_path, image_folders):
    """T_train of the alpha form and of sigmoid attention is [CLS] + patches (17), not the image side (32)."""
    for flags in (["--alpha", "4"], ["--attn_softmax", "sigmoid"]):
        summary = run_vit(vit_train_argv(tmp_path / "out", image_folders, *flags, "--dry_run"))
        assert summary["attention"]["train_seq_length"] == 17


@pytest.mark.slow
def test_vit_demo_prints_the_table(tmp_path, image_folders):
    """scripts/vit_demo.py in a reduced mode, on this test's images in place of the digits (already exported)."""
    import shutil
    import subprocess
    import sys

    data_dir = tmp_path / "digits"
    for split, folder in zip(("train", "validation"), image_folders, strict=True):
        shutil.copytree(folder, data_dir / split)
    (data_dir / "done").write_text("")
    output_dir = tmp_path / "vit-demo"
    script = Path(__file__).resolve().parents[1] / "scripts" / "vit_demo.py"
    command = [sys.executable, str(script), "--data_dir", str(data_dir), "--output_dir", str(output_dir)]
    command += ["--max_train_steps", "2", "--per_device_train_batch_size", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert sorted(summary["methods"]) == ["clipped_softmax", "gated_attention", "vanilla"]
    table = (output_dir / "summary.md").read_text()
    assert table in result.stdout and table.startswith("| method | FP top-1 | W8A8 top-1 |")
    for method, row in summary["methods"].items():
        fp = json.loads((output_dir / method / "eval-fp" / "all_results.json").read_text())
        assert row["fp_accuracy"] == fp["accuracy"] and len(row["background_mass"]) == 4  # vit-4L3H's layers
        config = json.loads((output_dir / method / "config.json").read_text())
        assert config.get("patch_embedding_layernorm", False) == (method != "vanilla")
    assert "=== [9/9]" in result.stdout
