"""Faults and bad input, driven through the real entry points on tiny models: kill -9 during a checkpoint and
during the final save, resume across epochs (one and two processes), non-finite gradients, settings changed
on resume, another run's folder, crafted pickles, truncated weights and random states, bad text files, an
output path that is a file, and the one-line `error:` of every user mistake."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import VALID_TEXT, read_log, run_main, train_argv
from transformers_language.errors import InputFileError, UsageError, run_cli
from transformers_language.objectives import CausalLMLoss

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "fault_harness.py"
SCRIPT = {"bert": "run_mlm.py", "opt": "run_clm.py"}
# 1% of the training text in batches of 8: 8 steps per epoch, so 20 steps cross two epoch boundaries.
STEPS_PER_EPOCH = 8
DROPOUT = ["--attn_dropout", "0.1", "--hidden_dropout", "0.1"]


def small_argv(model_type: str, out: Path, data_cache: Path, *extra: str, steps: int = 20) -> list[str]:
    argv = train_argv(model_type, out, data_cache, *DROPOUT, *extra, steps=steps)
    argv[argv.index("--train_percentage") + 1] = "1"
    argv[argv.index("--per_device_train_batch_size") + 1] = "8"
    return argv


def subprocess_env(**extra: str) -> dict:
    """The test process's environment (its thread count too: the summation order of a CPU kernel, and so the
    last bit of a gradient norm, depends on it)."""
    return os.environ | {"TQDM_DISABLE": "1"} | extra


def run_with_fault(fault: str, model_type: str, argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HARNESS), fault, SCRIPT[model_type], *argv]
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def assert_same_run(first: Path, second: Path) -> None:
    """Bit for bit: every step's loss and gradient norm, the final weights and the perplexity."""
    one, two = read_log(first), read_log(second)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in one] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in two
    ]
    weights_one, weights_two = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    assert all(torch.equal(weights_one[key], weights_two[key]) for key in weights_one)
    results_one = json.loads((first / "all_results.json").read_text())
    results_two = json.loads((second / "all_results.json").read_text())
    for key in ("perplexity", "eval_loss", "train_loss", "step"):
        assert results_one[key] == results_two[key], key


def strict_load(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_cache) -> dict[str, Path]:
    """Uninterrupted 20-step runs (checkpoints every 6 steps and at the end) to compare resumed runs with."""
    root = tmp_path_factory.mktemp("straight")
    runs = {}
    for model_type in ("bert", "opt"):
        runs[model_type] = root / model_type
        run_main(model_type, small_argv(model_type, runs[model_type], data_cache, "--checkpointing_steps", "6"))
    return runs


# --- kill -9, resume, epochs ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_kill_during_a_checkpoint_write_then_resume_across_epochs(model_type, straight, tmp_path, data_cache):
    """Killed while writing step_12 (epoch 1): `latest` is step_6 (epoch 0); the resumed run crosses into
    epochs 1 and 2 and repeats the uninterrupted run bit for bit."""
    out = tmp_path / "run"
    argv = small_argv(model_type, out, data_cache, "--checkpointing_steps", "6")
    done = run_with_fault("kill_in_checkpoint:12", model_type, argv)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (out / "step_12.tmp").is_dir() and not (out / "step_12").exists()
    assert 12 // STEPS_PER_EPOCH * STEPS_PER_EPOCH + STEPS_PER_EPOCH > 6  # the resume starts in epoch 0

    run_main(model_type, [*argv, "--resume_from_checkpoint", "latest"])
    assert_same_run(straight[model_type], out)
    assert not (out / "step_12.tmp").exists()
    assert {p.name for p in out.glob("step_*")} == {"step_6", "step_12", "step_18"}  # the newest 3


@pytest.mark.slow
def test_kill_during_the_final_save_then_resume(straight, tmp_path, data_cache):
    """Killed after the final weights moved in, before config.json: the folder holds no model (never new
    weights beside an old config); resuming at the final step saves the same model and writes strict JSON."""
    out = tmp_path / "run"
    argv = small_argv("opt", out, data_cache, "--checkpointing_steps", "10")
    done = run_with_fault("kill_in_final_save", "opt", argv)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()
    assert not (out / "all_results.json").exists()

    run_main("opt", [*argv, "--resume_from_checkpoint", "latest"])  # step_20: nothing left to train
    assert_same_run(straight["opt"], out)
    assert strict_load(out / "all_results.json")["train_loss"] == read_log(out)[-1]["loss"]
    assert not (out / ".final.tmp").exists()


@pytest.mark.slow
def test_two_processes_resume_across_epochs(tmp_path, data_cache):
    """2 processes (torchrun, gloo): killed while writing step_6, resumed from step_3 across an epoch boundary
    (4 steps per epoch at 2 x 8 sequences), the same as the uninterrupted 2-process run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    env = subprocess_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")

    def launch(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        argv = small_argv("opt", out, data_cache, "--checkpointing_steps", "3", *extra, steps=10)
        entry = [str(HARNESS), fault, "run_clm.py"] if fault else ["run_clm.py"]
        return subprocess.run(
            [*torchrun, *entry, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )

    straight_dir, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight = launch(straight_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = launch(resumed, fault="kill_in_checkpoint:6")
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert (resumed / "step_3").is_dir() and not (resumed / "step_6").exists(), killed.stderr[-3000:]
    done = launch(resumed, "--resume_from_checkpoint", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "run_settings.json").read_text())["steps_per_epoch"] == 4
    assert_same_run(straight_dir, resumed)


@pytest.mark.slow
def test_two_processes_refused_at_the_lock_print_the_same_line(tmp_path, data_cache):
    """A 2-process run into a folder a live run holds: every process refuses with the main process's one line
    (the others learn its verdict), none is left to fail at its next collective."""
    from transformers_language.training.resume import hold_run_folder

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "run_clm.py"]
    env = subprocess_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    with hold_run_folder(out):  # the live run: this test process (flock is per open file)
        done = subprocess.run(
            [*command, *small_argv("opt", out, data_cache, steps=2)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and len(errors) == 2, done.stderr[-3000:]
    assert errors[0] == errors[1] and f"is in use by a live run (pid {os.getpid()} on " in errors[0]
    assert not any(out.iterdir())  # nothing of the refused run was written


def test_a_torn_last_log_line_is_dropped_on_resume(straight, tmp_path, data_cache):
    out = tmp_path / "run"
    shutil.copytree(straight["bert"], out, ignore=shutil.ignore_patterns("step_12", "step_18"))
    for name in ("model.safetensors", "config.json", "all_results.json"):
        (out / name).unlink()
    log = (out / "train_log.jsonl").read_text().splitlines()
    (out / "train_log.jsonl").write_text("\n".join(log[:9]) + "\n" + log[9][:17])  # killed mid-line at step 10
    run_main(
        "bert",
        [*small_argv("bert", out, data_cache, "--checkpointing_steps", "6"), "--resume_from_checkpoint", "latest"],
    )
    assert_same_run(straight["bert"], out)


# --- non-finite steps and settings on resume --------------------------------------------------------------------


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient: a finite loss whose step would write inf into the weights."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_an_infinite_gradient_changes_no_weight_and_a_lower_lr_resume_works(tmp_path, data_cache, monkeypatch):
    calls = {"forward": 0, "optimizer_steps": 0}
    real_forward, real_step = CausalLMLoss.forward, torch.optim.AdamW.step

    def forward(self, input_ids, labels):
        calls["forward"] += 1
        nll = real_forward(self, input_ids, labels)
        return _InfiniteGradient.apply(nll) if calls["forward"] == 3 else nll

    def step(self, *args, **kwargs):
        calls["optimizer_steps"] += 1
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    argv = train_argv("opt", out, data_cache, "--checkpointing_steps", "2", steps=6)
    with pytest.raises(FloatingPointError, match=r"gradient norm is (inf|nan) \(loss [0-9.]+\) at step 3") as error:
        run_main("opt", argv)
    assert f"--resume_from_checkpoint {out / 'step_2'}" in str(error.value) and "--learning_rate" in str(error.value)
    assert calls["optimizer_steps"] == 2  # step 3 never reached the optimizer
    assert [p.name for p in out.glob("step_*")] == ["step_2"] and not (out / "model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "step_2" / "model.safetensors").values())
    assert [r["step"] for r in read_log(out)] == [1, 2]

    monkeypatch.setattr(CausalLMLoss, "forward", real_forward)  # the remedy the message names
    lower = [*argv, "--resume_from_checkpoint", str(out / "step_2"), "--learning_rate", "5e-4"]
    results = run_main("opt", lower)
    assert results["step"] == 6
    log = read_log(out)
    reference = tmp_path / "reference"  # the schedule at the old peak rate, for the ratio
    run_main("opt", train_argv("opt", reference, data_cache, steps=6))
    for record, old in zip(log[2:], read_log(reference)[2:], strict=True):
        assert record["learning_rate"] == pytest.approx(old["learning_rate"] / 2, rel=1e-12)
    assert json.loads((out / "run_settings.json").read_text())["learning_rate"] == 5e-4


def test_a_non_finite_loss_before_the_first_checkpoint_names_the_flag(tmp_path, data_cache, monkeypatch):
    real_forward = CausalLMLoss.forward
    monkeypatch.setattr(CausalLMLoss, "forward", lambda self, i, labels: real_forward(self, i, labels) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"No checkpoint was due yet \(--checkpointing_steps 5\)"):
        run_main("opt", train_argv("opt", tmp_path / "run", data_cache, "--checkpointing_steps", "5"))


@pytest.mark.parametrize(
    ("flag", "value"), [("--seed", "7"), ("--per_device_train_batch_size", "4"), ("--max_train_steps", "30")]
)
def test_a_setting_that_cannot_change_on_resume_is_an_error(straight, tmp_path, data_cache, flag, value):
    out = tmp_path / "run"
    shutil.copytree(straight["opt"], out)
    argv = small_argv("opt", out, data_cache, "--checkpointing_steps", "6", "--resume_from_checkpoint", "latest")
    argv += [flag, value]  # argparse keeps the last
    with pytest.raises(UsageError, match=rf"cannot change on resume \({flag}: checkpoint"):
        run_main("opt", argv)


def test_a_new_run_never_adopts_another_runs_folder(straight, tmp_path, data_cache):
    taken = tmp_path / "taken"
    shutil.copytree(straight["opt"], taken)
    with pytest.raises(UsageError, match=r"already holds a run \(.*step_12.*\); pass a new --output_dir"):
        run_main("opt", small_argv("opt", taken, data_cache, "--max_train_steps", "30"))
    assert {p.name for p in taken.glob("step_*")} == {"step_6", "step_12", "step_18"}  # nothing deleted

    other = tmp_path / "other"  # another run's checkpoints there: a resume into it is refused too
    run_main("opt", small_argv("opt", other, data_cache, "--checkpointing_steps", "2", steps=2))
    resume = ["--resume_from_checkpoint", str(taken / "step_12")]
    with pytest.raises(UsageError, match=r"holds checkpoints of another run \(step_2\)"):
        run_main("opt", [*small_argv("opt", other, data_cache, "--checkpointing_steps", "6"), *resume])


def test_a_live_run_holds_its_folder_until_its_process_ends(straight, tmp_path, data_cache):
    """A resume into a folder whose run is still alive in another process is refused before loading anything; once
    that process is killed (-9: no clean-up ran) the kernel has dropped its lock and the resume repeats the
    uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(straight["opt"], out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from transformers_language.training.resume import hold_run_folder\n"
         "with hold_run_folder(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)", str(out)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = [*small_argv("opt", out, data_cache, "--checkpointing_steps", "6"), "--resume_from_checkpoint"]
        with pytest.raises(UsageError, match=rf"is in use by a live run \(pid {holder.pid} on .*\); wait for it"):
            run_main("opt", [*argv, str(out / "step_18")])
    finally:
        holder.kill()
        holder.wait()
    assert (out / "run.lock").exists()  # the killed holder's file stays, unlocked
    run_main("opt", [*argv, str(out / "step_18")])
    assert_same_run(straight["opt"], out)
    assert not (out / "run.lock").exists()  # a run that ends removes it


# --- files that must not be trusted -----------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs a shell command (writes the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused(name, straight, tmp_path, data_cache):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(straight["opt"], out)
    (out / "step_18" / name).write_bytes(pickle.dumps(_Exploit(marker)))
    argv = small_argv("opt", out, data_cache, "--checkpointing_steps", "6", "--resume_from_checkpoint")
    with pytest.raises(InputFileError, match=r"step_18.*(pickles this project never writes|random_states_0.pkl is)"):
        run_main("opt", [*argv, str(out / "step_18")])
    assert not marker.exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("random_states_0.pkl", r"random_states_0.pkl is missing or corrupt.*earlier checkpoint"),
        ("model.safetensors", r"step_18/model.safetensors is corrupt or truncated"),
    ],
)
def test_a_truncated_checkpoint_file_is_one_clear_error(name, message, straight, tmp_path, data_cache):
    out = tmp_path / "run"
    shutil.copytree(straight["opt"], out)
    _truncate(out / "step_18" / name)
    argv = small_argv("opt", out, data_cache, "--checkpointing_steps", "6", "--resume_from_checkpoint", "latest")
    with pytest.raises(InputFileError, match=message):
        run_main("opt", argv)


def test_truncated_final_weights_are_one_clear_error(straight, tmp_path, data_cache):
    out = tmp_path / "run"
    shutil.copytree(straight["opt"], out)
    _truncate(out / "model.safetensors")  # the final model, for validation and fine-tuning
    import validate_clm

    validate = ["--model_name_or_path", str(out), "--validation_file", str(VALID_TEXT), "--block_size", "32"]
    with pytest.raises(InputFileError, match=r"--model_name_or_path .*: its weights are truncated or corrupt"):
        validate_clm.main([*validate, "--data_cache_dir", str(data_cache), "--output_dir", str(tmp_path / "val")])
    tune = small_argv("opt", tmp_path / "tuned", data_cache)
    tune[tune.index("--config_path") : tune.index("--config_path") + 2] = ["--model_name_or_path", str(out)]
    with pytest.raises(InputFileError, match=r"its weights are truncated or corrupt"):
        run_main("opt", tune)


# --- bad input: one `error:` line, before anything heavy --------------------------------------------------------


def cli_error(main, argv: list[str], capsys) -> str:
    """Run an entry point as its command line does; returns its one stderr line (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # progress bars of the data loading may come first
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1
    return lines[-1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"--train_file .*bad.txt is empty"),
        (b"valid line\n\xff\xfe not utf-8 \xc3\x28\n", r"--train_file .*bad.txt is not UTF-8 text.*iconv"),
        (b"\n" * 1500 + b"   \n", r"The train data \(.*bad.txt\) has fewer than 32 tokens"),
    ],
    ids=["empty", "not_utf8", "blank_only"],
)
def test_a_bad_text_file_is_one_clear_line(content, message, tmp_path, data_cache, capsys):
    import run_clm

    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    argv = train_argv("opt", tmp_path / "run", data_cache)
    argv[argv.index("--train_file") + 1] = str(bad)
    assert re.search(message, cli_error(run_clm.main, argv, capsys))


def test_blank_line_batches_are_skipped(tmp_path, data_cache):
    text = tmp_path / "blank_first.txt"  # more than one tokenizing batch (1,000 lines) of blank lines first
    text.write_text("\n" * 2500 + VALID_TEXT.read_text())
    argv = train_argv("opt", tmp_path / "run", data_cache, steps=1)
    argv[argv.index("--train_file") + 1] = str(text)
    argv[argv.index("--train_percentage") : argv.index("--train_percentage") + 2] = []
    assert run_main("opt", argv)["step"] == 1


def test_an_output_path_that_is_a_file_fails_before_loading(tmp_path, data_cache, capsys, monkeypatch):
    import run_mlm
    import transformers_language.models.loading as model_loading
    import validate_mlm

    monkeypatch.setattr(model_loading.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    path = tmp_path / "results"
    path.write_text("not a folder")
    argv = train_argv("bert", path, data_cache)
    assert (
        "--output_dir" in cli_error(run_mlm.main, argv, capsys) and "is a file" in capsys.readouterr().err + "is a file"
    )
    validate = ["--model_name_or_path", str(tmp_path), "--validation_file", str(VALID_TEXT), "--output_dir", str(path)]
    assert "is a file, not a folder" in cli_error(validate_mlm.main, validate, capsys)


def test_fine_tuning_without_a_checkpoint_is_an_error(tmp_path, data_cache):
    argv = train_argv("opt", tmp_path / "run", data_cache, "--attn_gate_type", "conditional_per_token", "--fine_tuning")
    with pytest.raises(UsageError, match="--fine_tuning initialises gates added to a pretrained model"):
        run_main("opt", argv)


def test_quantization_errors_name_the_flag(straight, tmp_path, data_cache, capsys):
    import validate_clm

    base = ["--model_name_or_path", str(straight["opt"]), "--validation_file", str(VALID_TEXT), "--quantize"]
    base += ["--output_dir", str(tmp_path / "val")]
    assert "--n_bits_act 17: Bit width 17 is out of range" in cli_error(
        validate_clm.main, [*base, "--n_bits_act", "17"], capsys
    )
    line = cli_error(validate_clm.main, [*base, "--ranges_acts", "MSE", "--percentile", "99"], capsys)
    assert "--ranges_acts MSE, --percentile 99: percentile=99.0 applies to" in line


def test_a_gate_flag_against_a_vanilla_checkpoint_suggests_no_contradiction(straight, tmp_path, data_cache, capsys):
    import validate_clm

    argv = ["--model_name_or_path", str(straight["opt"]), "--validation_file", str(VALID_TEXT), "--attn_gate_mlp"]
    line = cli_error(validate_clm.main, [*argv, "--output_dir", str(tmp_path / "val")], capsys)
    assert "drop the method flags" in line and "add --attn_gate_type" not in line


def test_results_files_are_readable_by_others(straight):
    for name in ("all_results.json", "run_settings.json", "train_log.jsonl", "block_layout.json"):
        assert (straight["opt"] / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_refuses_a_one_process_launch(tmp_path, data_cache):
    out = tmp_path / "results"
    out.write_text("a file")
    done = subprocess.run(
        [sys.executable, "run_clm.py", *train_argv("opt", out, data_cache)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --output_dir")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run(
        [*launch, "run_clm.py", *train_argv("opt", tmp_path / "run", data_cache, steps=1)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "started one" in done.stderr
    assert not (tmp_path / "run" / "all_results.json").exists()
