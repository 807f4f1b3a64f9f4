"""The shell presets, model configs and accelerate configs: every `scripts/*.sh` preset runs its exact
`accelerate launch` line (through a stand-in `accelerate` on PATH that records its arguments) and the recorded
flags go through the real entry point in `--dry_run` mode, which resolves the model config and method on the
meta device. The hub is unreachable here, so the tokenizer is the one flag the test overrides (the presets'
documented override mechanism: flags after the preset's own win)."""

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from transformers import AutoConfig, AutoTokenizer

from tests.conftest import TOKENIZERS, tiny_config
from tests.test_vit_end_to_end import run_vit, vit_train_argv, write_image_folders
from transformers_language import AttentionConfig, build_model
from transformers_language.jobs.pretrain import pretrain
from transformers_language.jobs.validate import validate
from transformers_language.models.loading import model_class, read_yaml_overrides

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# What the paper states for each run: (objective, layers, heads, hidden, sequence length, sequences per step,
# learning rate, warmup, steps, weight decay, attention settings that differ from vanilla).
BERT = ("mlm", 12, 12, 768, 128, 256, 1e-4, 10_000, 1_000_000, 0.01)
OPT_125M = ("clm", 12, 12, 768, 512, 48 * 4, 4e-4, 2000, 125_000, 0.1)
OPT_350M = ("clm", 24, 16, 1024, 512, 24 * 11, 4e-4, 2000, 100_000, 0.1)
OPT_1_3B = ("clm", 24, 32, 2048, 512, 14 * 18, 4e-4, 2000, 100_000, 0.1)
GATE_025 = {"gate_type": "conditional_per_token", "init_prob": 0.25}
TRAINING_PRESETS = {
    "bert_base_vanilla": (*BERT, {}),
    "bert_base_clipped_softmax": (*BERT, {"softmax": "clipped(-0.025:1)"}),
    "bert_base_gated_attention": (*BERT, {"gate_type": "conditional_per_token", "gate_network": "mlp"}),
    "opt_125m_vanilla": (*OPT_125M, {}),
    "opt_125m_clipped_softmax": (*OPT_125M, {"alpha": 12.0, "train_seq_length": 512}),
    "opt_125m_gated_attention": (*OPT_125M, GATE_025),
    "opt_350m_vanilla": (*OPT_350M, {}),
    "opt_350m_gated_attention": (*OPT_350M, GATE_025),
    "opt_1.3b_vanilla": (*OPT_1_3B, {}),
    "opt_1.3b_gated_attention": (*OPT_1_3B, GATE_025 | {"gate_network": "all_heads_linear"}),
}
# Validation presets: (objective, quantized, expected settings).
VALIDATION_PRESETS = {
    "validate_bert": ("mlm", False, {"max_seq_length": 128}),
    "validate_bert_w8a8": ("mlm", True, {"ranges_weights": "minmax", "percentile": None, "est_num_batches": 16}),
    "validate_opt": ("clm", False, {"block_size": 512}),
    "validate_opt_w8a8": ("clm", True, {"ranges_weights": "MSE", "percentile": 99.999, "est_num_batches": 16}),
}
# ViT presets: attention settings that differ from vanilla, and whether the patch embedding has a LayerNorm.
VIT_PRESETS = {
    "vit_s16_vanilla": ({}, False),
    "vit_s16_clipped_softmax": ({"softmax": "clipped(-0.0001:1)"}, True),
    "vit_s16_gated_attention": ({"gate_type": "conditional_per_token", "init_prob": 0.5}, True),
}
VIT_VALIDATION_PRESETS = {"validate_vit": False, "validate_vit_w8a8": True}
# Llama-60M presets (Gu et al.'s model): the attention settings that differ from vanilla.
LLAMA_PRESETS = {
    "llama_60m_vanilla": {},
    "llama_60m_gated_headwise": {"gate_type": "headwise"},
    "llama_60m_gated_elementwise": {"gate_type": "elementwise"},
    "llama_60m_softmax1": {"softmax": "softmax1"},
    "llama_60m_clipped_softmax": {"alpha": 12.0, "train_seq_length": 2048},
}
LLAMA_VALIDATION_PRESETS = {"validate_llama": False, "validate_llama_w8a8": True}
STAND_IN = """#!/usr/bin/env bash
# Test stand-in for accelerate: record the arguments, one per line, and succeed.
printf '%s\\n' "$@" > "$ACCELERATE_RECORD"
"""


def test_every_preset_is_covered():
    presets = {p.stem for p in SCRIPTS.glob("*.sh")} - {"demo", "gpu_check"}
    assert presets == (
        set(TRAINING_PRESETS)
        | set(VALIDATION_PRESETS)
        | set(VIT_PRESETS)
        | set(VIT_VALIDATION_PRESETS)
        | set(LLAMA_PRESETS)
        | set(LLAMA_VALIDATION_PRESETS)
    )


def launch_preset(tmp_path: Path, name: str, *args: str) -> tuple[Path, str, list[str]]:
    """Run scripts/<name>.sh with the stand-in; returns (accelerate config, entry script, its flags)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "accelerate").write_text(STAND_IN)
    (bin_dir / "accelerate").chmod(0o755)
    record = tmp_path / f"{name}.args"
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "ACCELERATE_RECORD": str(record)}
    subprocess.run(["bash", str(SCRIPTS / f"{name}.sh"), *args], check=True, env=env, cwd=tmp_path)
    launch, config_flag, config, script, *flags = record.read_text().splitlines()
    assert (launch, config_flag) == ("launch", "--config_file")
    return Path(config), script, flags


@pytest.mark.parametrize("name", sorted(TRAINING_PRESETS))
def test_training_preset_resolves_to_the_paper_run(name, tmp_path):
    objective, layers, heads, hidden, seq_length, per_step, lr, warmup, steps, decay, method = TRAINING_PRESETS[name]
    model_type = "bert" if objective == "mlm" else "opt"
    config_file, script, flags = launch_preset(
        tmp_path, name, "--tokenizer_name", str(TOKENIZERS[model_type]), "--output_dir", str(tmp_path / "out")
    )
    assert config_file == REPO / "accelerate_configs" / "1gpu_fp16.yaml"
    assert script == str(REPO / f"run_{objective}.py")
    assert flags.count("--tokenizer_name") == 2 and flags[-4:-2] == ["--tokenizer_name", str(TOKENIZERS[model_type])]

    summary = pretrain(objective, [*flags, "--dry_run"])
    config, settings = summary["config"], summary["settings"]
    layout = (config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"])
    assert layout == (layers, heads, hidden)
    assert summary["seq_length"] == seq_length and summary["sequences_per_step"] == per_step
    assert (settings["learning_rate"], settings["num_warmup_steps"]) == (lr, warmup)
    assert (settings["max_train_steps"], settings["weight_decay"]) == (steps, decay)
    assert settings["dataset_setup"] == "bookcorpus_and_wiki" and settings["output_dir"] == str(tmp_path / "out")
    expected, resolved = AttentionConfig(**method), AttentionConfig.from_dict(summary["attention"])
    assert (resolved.clipped, resolved.gamma, resolved.zeta) == (expected.clipped, expected.gamma, expected.zeta)
    assert replace(resolved, softmax=expected.softmax) == expected
    assert config["attention_variant"] == summary["attention"]
    if model_type == "opt":
        assert settings["wd_LN_gamma"] == (name.startswith("opt_125m"))
        assert config["do_layer_norm_before"] and config["word_embed_proj_dim"] == hidden
        assert config["init_std"] == 0.006 and config["dropout"] == 0.1
    if expected.alpha is not None:
        assert resolved.gamma == pytest.approx(-12 / 512)
    gated = "AttentionGate" in summary["modules"] or "AllHeadsLinearGate" in summary["modules"]
    assert gated == (expected.gate_type != "none")


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT and OPT checkpoints with the local tokenizers (with the positions the presets need)."""
    root = tmp_path_factory.mktemp("preset_checkpoints")
    paths = {}
    for model_type, extra in (("bert", {"max_position_embeddings": 128}), ("opt", {"max_position_embeddings": 512})):
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS[model_type])
        model = build_model(
            tiny_config(model_type, vocab_size=len(tokenizer), **extra),
            AttentionConfig(alpha=4.0, train_seq_length=128),
        )
        paths[model_type] = root / model_type
        model.save_pretrained(paths[model_type])
        tokenizer.save_pretrained(paths[model_type])
    return paths


@pytest.mark.parametrize("name", sorted(VALIDATION_PRESETS))
def test_validation_preset_resolves(name, tmp_path, saved_checkpoints):
    objective, quantized, expected = VALIDATION_PRESETS[name]
    checkpoint = saved_checkpoints["bert" if objective == "mlm" else "opt"]
    _, script, flags = launch_preset(
        tmp_path, name, str(checkpoint), "--accelerate_config", str(REPO / "accelerate_configs" / "cpu.yaml")
    )
    assert script == str(REPO / f"validate_{objective}.py")
    summary = validate(objective, [*flags, "--dry_run"])
    settings = summary["settings"]
    assert settings["model_name_or_path"] == str(checkpoint)
    assert settings["output_dir"] == str(checkpoint / ("eval-w8a8" if quantized else "eval-fp"))
    assert (summary["quantization"] is not None) == quantized
    for key, value in expected.items():
        assert (summary["quantization"] if key in ("ranges_weights", "percentile") else settings)[key] == value
    assert summary["attention"]["alpha"] == 4.0  # from the checkpoint's config.json


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory) -> Path:
    """A local image folder standing in for ImageNet-1k (the hub is unreachable here): the presets' dataset
    flag is overridden with it, and its one split serves as the validation split too."""
    train, _ = write_image_folders(tmp_path_factory.mktemp("imagenet_stand_in"), (2, 1))
    return train


@pytest.mark.parametrize("name", sorted(VIT_PRESETS))
def test_vit_preset_resolves_to_the_paper_run(name, tmp_path, image_dataset):
    method, patch_layernorm = VIT_PRESETS[name]
    stand_in = ["--dataset_name", str(image_dataset), "--validation_split", "train"]
    _, script, flags = launch_preset(tmp_path, name, *stand_in, "--output_dir", str(tmp_path / "out"))
    assert script == str(REPO / "run_vit.py") and flags.count("--dataset_name") == 2
    summary = pretrain("image_classification", [*flags, "--dry_run"])
    config, settings = summary["config"], summary["settings"]
    layout = (config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"])
    assert layout == (12, 6, 384) and (config["intermediate_size"], config["patch_size"]) == (1536, 16)
    assert summary["seq_length"] == 224 and config["image_size"] == 224 and len(config["id2label"]) == 3
    assert config.get("patch_embedding_layernorm", False) == patch_layernorm
    assert ("LayerNorm" in summary["modules"]) and summary["sequences_per_step"] == 512
    recipe = ("learning_rate", "weight_decay", "num_train_epochs", "lr_scheduler_type", "label_smoothing")
    assert tuple(settings[key] for key in recipe) == (1e-3, 0.05, 300, "cosine", 0.1)
    augment = ("randaugment_num_ops", "randaugment_magnitude", "mixup_alpha", "cutmix_alpha")
    assert tuple(settings[key] for key in augment) == (2, 9, 0.8, 1.0)
    assert AttentionConfig.from_dict(summary["attention"]) == AttentionConfig(**method)


@pytest.mark.parametrize("name", sorted(VIT_VALIDATION_PRESETS))
def test_vit_validation_preset_resolves(name, tmp_path, image_dataset):
    checkpoint = tmp_path / "vit"
    train_dir = image_dataset
    run_vit(vit_train_argv(checkpoint, (train_dir, train_dir), "--max_train_steps", "1"))
    stand_in = ["--dataset_name", str(image_dataset), "--validation_split", "train", "--train_split", "train"]
    cpu = ["--accelerate_config", str(REPO / "accelerate_configs" / "cpu.yaml")]
    _, script, flags = launch_preset(tmp_path, name, str(checkpoint), *cpu, *stand_in)
    assert script == str(REPO / "validate_vit.py")
    summary = validate("image_classification", [*flags, "--dry_run"])
    assert summary["settings"]["output_dir"] == str(
        checkpoint / ("eval-w8a8" if VIT_VALIDATION_PRESETS[name] else "eval-fp")
    )
    assert (summary["quantization"] is not None) == VIT_VALIDATION_PRESETS[name]


@pytest.mark.parametrize("name", sorted(LLAMA_PRESETS))
def test_llama_preset_resolves_to_the_60m_sink_study_run(name, tmp_path):
    tokenizer = str(TOKENIZERS["llama"])
    config_file, script, flags = launch_preset(
        tmp_path, name, "--tokenizer_name", tokenizer, "--output_dir", str(tmp_path / "out")
    )
    assert config_file == REPO / "accelerate_configs" / "1gpu_bf16.yaml"
    assert script == str(REPO / "run_llama.py")
    summary = pretrain("clm", [*flags, "--dry_run"], family_name="llama")
    config, settings = summary["config"], summary["settings"]
    shape = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size")
    assert tuple(config[key] for key in shape) == (10, 8, 8, 768, 1536)
    assert summary["model_class"] == "LlamaForCausalLMWithVariants" and not config["tie_word_embeddings"]
    assert summary["seq_length"] == 2048 and summary["sequences_per_step"] == 512
    recipe = ("learning_rate", "num_warmup_steps", "max_train_steps", "lr_scheduler_type", "weight_decay")
    assert tuple(settings[key] for key in recipe) == (4e-4, 500, 5000, "cosine", 0.1)
    assert (settings["adam_beta1"], settings["adam_beta2"], settings["final_lr_fraction"]) == (0.9, 0.95, 0.1)
    assert AttentionConfig.from_dict(summary["attention"]) == AttentionConfig(**LLAMA_PRESETS[name])


@pytest.mark.parametrize("name", sorted(LLAMA_VALIDATION_PRESETS))
def test_llama_validation_preset_resolves(name, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS["llama"])
    checkpoint = tmp_path / "llama"
    model = build_model(tiny_config("llama", vocab_size=len(tokenizer), max_position_embeddings=2048))
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    cpu = ["--accelerate_config", str(REPO / "accelerate_configs" / "cpu.yaml")]
    _, script, flags = launch_preset(tmp_path, name, str(checkpoint), *cpu)
    assert script == str(REPO / "validate_llama.py")
    summary = validate("clm", [*flags, "--dry_run"], family_name="llama")
    quantized = LLAMA_VALIDATION_PRESETS[name]
    assert summary["settings"]["output_dir"] == str(checkpoint / ("eval-w8a8" if quantized else "eval-fp"))
    assert summary["seq_length"] == 2048 and (summary["quantization"] is not None) == quantized
    if quantized:
        assert (summary["quantization"]["ranges_weights"], summary["quantization"]["percentile"]) == ("MSE", 99.999)


def test_preset_usage_errors(tmp_path):
    for args, message in (
        ((), "usage: "),
        (("--plot",), "usage: "),
        (("ckpt", "--accelerate_config", "x.yaml"), "x.yaml"),
    ):
        result = subprocess.run(
            ["bash", str(SCRIPTS / "validate_opt.sh"), *args], cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("path", sorted((REPO / "model_configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_config_loads(path):
    overrides = read_yaml_overrides(str(path))
    model_type = path.stem.split("-")[0]
    config = type(AutoConfig.for_model(model_type))(**overrides)
    with torch.device("meta"):
        model = model_class(model_type)(config)
    assert model.config.num_hidden_layers == overrides["num_hidden_layers"]
    if model_type == "opt":
        decoder = model.model.decoder
        assert decoder.project_in is None and decoder.project_out is None
        assert config.do_layer_norm_before and config.init_std == 0.006 and config.dropout == 0.1
    if path.stem.endswith("-small"):
        ffn = overrides["ffn_dim" if model_type == "opt" else "intermediate_size"]
        swiglu = model_type == "llama"  # three FFN matrices: 2/3 of 4 x hidden, rounded to 64, keeps the size
        layout = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, ffn)
        assert layout == (4, 256, 4, 704 if swiglu else 1024)
    if model_type == "llama":
        assert config.head_dim * config.num_attention_heads == config.hidden_size


ACCELERATE_CONFIGS = {
    "1gpu_fp16": ("NO", "fp16", False),
    "1gpu_bf16": ("NO", "bf16", False),
    "1gpu_fp32": ("NO", "no", False),
    "multi_gpu": ("MULTI_GPU", "fp16", False),
    "fsdp": ("FSDP", "bf16", False),
    "cpu": ("NO", "no", True),
}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_loads(name):
    path = REPO / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    distributed, precision, cpu = ACCELERATE_CONFIGS[name]
    assert (str(config.distributed_type).split(".")[-1], str(config.mixed_precision), config.use_cpu) == (
        distributed,
        precision,
        cpu,
    )
    if name == "fsdp":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert set(yaml.safe_load(path.read_text())) <= set(vars(config))


def test_no_other_accelerate_configs():
    assert {p.stem for p in (REPO / "accelerate_configs").glob("*.yaml")} == set(ACCELERATE_CONFIGS)


def _local_stand_in(path: Path):
    """Stands in for a hub source of `bookcorpus_and_wiki` (the hub is unreachable here): a shared text file."""
    from transformers_language.data.sources import SharedFileSource, shared_folder

    return SharedFileSource(str(path.relative_to(shared_folder())))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINING_PRESETS))
def test_training_preset_runs_the_plan_its_dry_run_prints(name, tmp_path, monkeypatch, data_cache):
    """Each preset, shrunk to a tiny model and one step (flags after the preset's win), executes exactly the
    plan its --dry_run prints."""
    import json

    from tests.conftest import TINY_YAML, TRAIN_TEXT, VALID_TEXT
    from transformers_language.data.sources import DATASET_SETUPS

    monkeypatch.setitem(
        DATASET_SETUPS,
        "bookcorpus_and_wiki",
        {"train": (_local_stand_in(TRAIN_TEXT),), "validation": (_local_stand_in(VALID_TEXT),)},
    )
    objective = TRAINING_PRESETS[name][0]
    model_type = "bert" if objective == "mlm" else "opt"
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY_YAML[model_type])
    seq_flag = "--max_seq_length" if model_type == "bert" else "--block_size"
    shrink = ["--tokenizer_name", str(TOKENIZERS[model_type]), "--config_path", str(tiny), seq_flag, "32"]
    shrink += ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "16", "--max_train_steps", "1"]
    shrink += ["--train_percentage", "2", "--validation_percentage", "2", "--data_cache_dir", str(data_cache)]
    shrink += ["--output_dir", str(tmp_path / "out")]
    _, _, flags = launch_preset(tmp_path, name, *shrink)
    dry = pretrain(objective, [*flags, "--dry_run"])
    pretrain(objective, flags)
    executed = json.loads((tmp_path / "out" / "run_settings.json").read_text())["plan"]
    assert executed == json.loads(json.dumps(dry, default=str))
    assert executed["settings"]["dataset_setup"] == "bookcorpus_and_wiki"
