"""Faults and bad input, second round (issue 30), through the real entry points on tiny models: the comparison's
resume (a foreign result, a NaN perplexity, a torn record), flags after `--` the comparison owns, a transformed
checkpoint without its config key, non-finite weights, optimizer and clipping values, an unknown model type, two
runs into one folder, broken images and empty class folders, the demo's resume after a validation flag changed,
a full disk during a checkpoint, and a refused resume that names the differing fields."""

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_main, train_argv
from tests.test_ptq_validate import _compare, _compare_module
from tests.test_validate import CALIBRATION_DATA, checkpoints, copy_files, run_validate, validate_argv  # noqa: F401
from tests.test_vit_end_to_end import image_folders, run_vit, vit_train_argv, write_image_folders  # noqa: F401
from transformers_language.errors import InputFileError, UsageError

# --- 1-3: the comparison ----------------------------------------------------------------------------------------


@pytest.fixture
def compared(checkpoints, tmp_path, data_cache):  # noqa: F811
    """A finished one-recipe comparison: (output folder, its rows, a function that resumes it)."""
    out, flags = tmp_path / "compare", ("--bits", "W8A8", "--recipes", "per_tensor", "--draws", "1")
    rows = _compare([checkpoints["opt"]], out, tmp_path, data_cache, *flags)

    def resume():
        return _compare([checkpoints["opt"]], out, tmp_path, data_cache, *flags, "--resume")

    return out / checkpoints["opt"].name, rows, resume


def _count_validations(monkeypatch, run_dir):
    import transformers_language.jobs.validate

    calls = []
    results = json.loads((run_dir / "FP" / "fp" / "all_results.json").read_text())
    monkeypatch.setattr(transformers_language.jobs.validate, "validate", lambda *a, **k: calls.append(a) or results)
    return calls


def test_resume_reads_a_run_back_from_its_own_record_never_a_foreign_result(compared, monkeypatch):
    run_dir, rows, resume = compared
    # An interrupted run with other flags rewrote the folder's all_results.json but never finished its record.
    (run_dir / "W8A8" / "per_tensor" / "draw_0" / "all_results.json").write_text(json.dumps({"perplexity": 1.0}))
    calls = _count_validations(monkeypatch, run_dir)
    assert resume() == rows and not calls


def test_resume_redoes_a_run_whose_record_is_missing_or_torn_and_reads_a_nan_perplexity(compared, monkeypatch):
    run_dir, _, resume = compared
    record = run_dir / "W8A8" / "per_tensor" / "draw_0" / "compare_run.json"
    values = json.loads(record.read_text())
    values["results"]["perplexity"] = None  # a non-finite perplexity, as strict JSON writes it
    record.write_text(json.dumps(values))
    calls = _count_validations(monkeypatch, run_dir)
    resumed = resume()
    assert not calls and math.isnan(resumed[1]["value"]) and math.isnan(resumed[1]["gap"])
    record.write_text(record.read_text()[:20])  # torn
    (run_dir / "FP" / "fp" / "compare_run.json").unlink()  # missing
    resume()
    assert len(calls) == 2


@pytest.mark.parametrize("flag", ["--model_name_or_path", "--output_dir", "--n_bits", "--weight_granularity"])
def test_flags_the_comparison_sets_are_refused_after_the_separator(flag, tmp_path):
    with pytest.raises(UsageError, match=rf"{flag} after -- would override what the comparison sets"):
        _compare_module().main([str(tmp_path / "a"), "--output_dir", str(tmp_path / "out"), "--", flag, "x"])


# --- 4, 5, 8: checkpoints that do not match their config, non-finite weights, an unknown model type --------------


def test_shortcut_affines_without_their_config_key_are_refused(checkpoints, tmp_path, data_cache):  # noqa: F811
    from transformers_language import model_class
    from transformers_language.models.norm_sites import CONFIG_KEY

    transformed = copy_files(checkpoints["bert"], tmp_path / "transformed")
    model = model_class("bert").from_pretrained(transformed)
    setattr(model.config, CONFIG_KEY, ["gamma_migration"])
    model_class("bert")(model.config).save_pretrained(tmp_path / "with_affines")  # the affines' weights
    weights = load_file(tmp_path / "with_affines" / "model.safetensors")
    affines = {key: value for key, value in weights.items() if "shortcut_affine" in key}
    assert affines
    merged = load_file(transformed / "model.safetensors") | affines
    save_file(merged, transformed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"equivalent-transform shortcut affines, but its config.json names no"):
        run_validate("bert", validate_argv("bert", transformed, tmp_path / "eval", data_cache))


@pytest.mark.parametrize("quantize", [False, True])
def test_a_non_finite_weight_is_refused_naming_the_tensor(quantize, checkpoints, tmp_path, data_cache):  # noqa: F811
    broken = copy_files(checkpoints["opt"], tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    name = next(key for key in weights if key.endswith("fc2.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    extra = ["--quantize", "--token_clipping", *CALIBRATION_DATA] if quantize else []
    with pytest.raises(UsageError, match=rf"the weight {name} holds 1 non-finite value"):
        run_validate("opt", validate_argv("opt", broken, tmp_path / "eval", data_cache, *extra))


def test_a_clipping_search_with_no_finite_loss_is_an_error():
    from quantization.quantizer import Quantizer
    from quantization.token_clipping import TokenQuantileEstimator, search_quantile

    quantizer = Quantizer(8, symmetric=False, estimator=TokenQuantileEstimator(8, False, None))
    quantizer.estimator.observe(torch.randn(2, 5, 4))
    with pytest.raises(FloatingPointError, match="not finite for any quantile searched"):
        search_quantile([quantizer], (1.0, 0.99), lambda: float("nan"))


def test_an_unknown_model_type_is_one_line_in_the_training_script(checkpoints, tmp_path, data_cache):  # noqa: F811
    mystery = copy_files(checkpoints["opt"], tmp_path / "mystery")
    config = json.loads((mystery / "config.json").read_text()) | {"model_type": "mystery"}
    (mystery / "config.json").write_text(json.dumps(config))
    argv = train_argv("opt", tmp_path / "run", data_cache, "--model_name_or_path", str(mystery))
    with pytest.raises(InputFileError, match=r"--model_name_or_path .*mystery: no opt model config there"):
        run_main("opt", argv)


# --- 6, 7: optimizer and clipping values, checked with the flags ---------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, rule",
    [
        ("--learning_rate", "-1", "be a finite number >= 0"),
        ("--learning_rate", "nan", "be a finite number >= 0"),
        ("--adam_beta1", "1.5", r"lie in \[0, 1\)"),
        ("--adam_epsilon", "-1", "be a finite number > 0"),
        ("--max_grad_norm", "-1", "be a finite number >= 0"),
    ],
)
def test_optimizer_values_are_checked_before_anything_loads(flag, value, rule, tmp_path, data_cache, monkeypatch):
    import transformers_language.models.loading as loading

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    argv = train_argv("opt", tmp_path / "run", data_cache, flag, value)
    with pytest.raises(UsageError, match=rf"{flag} must {rule}, got {value}"):
        run_main("opt", argv)
    with pytest.raises(UsageError, match=rf"{flag} must {rule}"):  # on a resume too
        run_main("opt", [*argv, "--resume_from_checkpoint", "latest"])


# --- 9, 13, 14: the output folder -------------------------------------------------------------------------------


def test_a_second_run_into_a_folder_taken_meanwhile_is_refused(tmp_path, data_cache, monkeypatch):
    """Two new runs into one folder: while the other is live its lock refuses this one; and one that started,
    recorded itself and ended between this run's first check and its lock is caught by the check under the lock."""
    import transformers_language.jobs.pretrain as pretrain
    from transformers_language.training.checkpoints import RUN_SETTINGS
    from transformers_language.training.resume import RUN_LOCK, hold_run_folder

    out = tmp_path / "run"
    with hold_run_folder(out):  # a live run (flock is per open file, so this process's own holder counts)
        with pytest.raises(UsageError, match=r"is in use by a live run \(pid \d+ on "):
            run_main("opt", train_argv("opt", out, data_cache))
        assert [path.name for path in out.iterdir()] == [RUN_LOCK]  # nothing of this run was written
    assert not any(out.iterdir())

    real_check, other_runs = pretrain.check_new_run_folder, []

    def another_run_records_itself_meanwhile(output_dir):
        real_check(output_dir)
        if not other_runs:  # once, right after this run's first check: the other run starts, records itself, ends
            other_runs.append(output_dir)
            with hold_run_folder(output_dir):
                (output_dir / RUN_SETTINGS).write_text("{}")

    monkeypatch.setattr(pretrain, "check_new_run_folder", another_run_records_itself_meanwhile)
    with pytest.raises(UsageError, match=r"already holds a run \(run_settings.json\)"):
        run_main("opt", train_argv("opt", out, data_cache))
    assert [path.name for path in out.iterdir()] == [RUN_SETTINGS]  # the other run's record, untouched


def test_a_run_that_fails_before_it_records_itself_gives_the_folder_back(tmp_path, data_cache):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="longer than the model's position table"):
        run_main("opt", train_argv("opt", out, data_cache, "--block_size", "4096"))
    assert not any(out.iterdir())  # no lock left: the corrected command runs in the same folder
    run_main("opt", train_argv("opt", out, data_cache, "--max_train_steps", "1"))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(
    tmp_path, data_cache, monkeypatch
):
    from accelerate import Accelerator

    from transformers_language.errors import OutputWriteError

    out, real_save = tmp_path / "run", Accelerator.save_state

    def disk_fills_at_step_4(self, output_dir, *args, **kwargs):
        if "step_4" in str(output_dir):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_fills_at_step_4)
    with pytest.raises(OutputWriteError, match=rf"checkpoint step_4 into {out} failed \(No space left on device\)"):
        run_main("opt", train_argv("opt", out, data_cache, "--checkpointing_steps", "2"))
    assert sorted(path.name for path in out.glob("step_*")) == ["step_2"]  # no step_4.tmp, step_2 intact
    assert load_file(out / "step_2" / "model.safetensors")


def test_a_refused_resume_names_the_differing_config_fields_only(tmp_path, data_cache):
    out = tmp_path / "run"
    run_main("opt", train_argv("opt", out, data_cache, "--checkpointing_steps", "2", "--hidden_dropout", "0.1"))
    resumed = train_argv("opt", out, data_cache, "--checkpointing_steps", "2", "--hidden_dropout", "0.2")
    with pytest.raises(UsageError) as refused:
        run_main("opt", [*resumed, "--resume_from_checkpoint", "latest"])
    message = str(refused.value)
    assert "model_config: dropout (checkpoint 0.1, now 0.2)" in message
    assert "vocab_size" not in message and len(message) < 600


# --- 10, 11: image folders --------------------------------------------------------------------------------------


def _broken_folders(root: Path) -> tuple[Path, Path]:
    train, validation = write_image_folders(root, (4, 2))
    good = (train / "blobs" / "0.png").read_bytes()
    (train / "blobs" / "truncated.png").write_bytes(good[: len(good) // 2])
    (train / "vertical" / "empty.png").write_bytes(b"")
    (train / "horizontal" / "text.png").write_text("not an image")
    return train, validation


def test_broken_images_are_named_before_training_or_skipped_by_the_flag(tmp_path, caplog):
    folders = _broken_folders(tmp_path / "images")
    with pytest.raises(InputFileError, match=r"truncated.png and 2 more cannot be read as an image"):
        run_vit(vit_train_argv(tmp_path / "refused", folders))
    assert not (tmp_path / "refused" / "config.json").exists()
    results = run_vit(vit_train_argv(tmp_path / "skipped", folders, "--skip_broken_images"))
    assert math.isfinite(results["eval_loss"])
    assert "Skipped 3 broken image file(s)" in caplog.text and "text.png" in caplog.text


def test_an_empty_class_folder_is_refused_before_it_shifts_the_labels(tmp_path):
    train, validation = write_image_folders(tmp_path / "images", (2, 1))
    for path in (train / "horizontal").iterdir():
        path.unlink()
    with pytest.raises(InputFileError, match=r"the class folder\(s\) horizontal hold no images"):
        run_vit(vit_train_argv(tmp_path / "run", (train, validation)))


# --- 12: the demo's resume -----------------------------------------------------------------------------------------


def test_the_demo_resume_reruns_only_the_validations_whose_flags_changed(tmp_path):
    from transformers_language.jobs.stages import method_stages, run_method

    calls = []

    def job(objective, argv, family_name=None):
        out = Path(argv[argv.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "all_results.json").write_text(json.dumps({"argv": argv}))
        calls.append(out.name)
        return {"argv": argv}

    run_dir = tmp_path / "vanilla"

    def stages(batches: str):
        return method_stages(
            "vanilla", run_dir, "train", ["--seed", "1"], ["--seed", "1"], ["--est_num_batches", batches]
        )

    stages_before = [(title, job, argv) for title, _, argv in stages("16")]
    run_method("vanilla", run_dir, stages_before, "clm", False, (0, 3))
    assert calls == ["vanilla", "eval-fp", "eval-w8a8"]
    stages_after = [(title, job, argv) for title, _, argv in stages("8")]
    results = run_method("vanilla", run_dir, stages_after, "clm", True, (0, 3))
    assert calls[3:] == ["eval-w8a8"]  # the model and its FP validation are kept
    assert "8" in results[2]["argv"] and results[0]["argv"] == stages_before[0][2]
    run_method("vanilla", run_dir, stages_after, "clm", True, (0, 3))
    assert len(calls) == 4  # now finished with these flags: read back
    shutil.rmtree(run_dir)
