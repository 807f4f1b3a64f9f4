"""The data pipeline: blocks against a reference tokenization, splitting, caching, and error messages."""

import json

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

import transformers_language.data.sources as data_sources
import transformers_language.data.text as data
from tests.conftest import TOKENIZERS, TRAIN_TEXT, VALID_TEXT
from transformers_language.arguments import typed_group
from transformers_language.errors import InputFileError


def data_args(tmp_path, **overrides) -> data.DataArgs:
    values = dict(
        dataset_setup=None,
        train_file=str(TRAIN_TEXT),
        validation_file=str(VALID_TEXT),
        preprocessing_num_workers=None,
        overwrite_cache=False,
        data_cache_dir=str(tmp_path / "cache"),
        train_percentage=None,
        validation_percentage=10,
        block_layout="stream",
    )
    return data.DataArgs(**(values | overrides))


@pytest.fixture(scope="module")
def tokenizers():
    return {name: AutoTokenizer.from_pretrained(path) for name, path in TOKENIZERS.items()}


def reference_blocks(lines: list[str], tokenizer, seq_length: int) -> list[list[int]]:
    """Non-blank lines tokenized with special tokens, concatenated per group batch, cut into full blocks."""
    rows = [tokenizer(line)["input_ids"] for line in lines if line.strip()]
    blocks = []
    for start in range(0, len(rows), data.GROUP_BATCH_SIZE):
        stream = [t for row in rows[start : start + data.GROUP_BATCH_SIZE] for t in row]
        blocks += [stream[i : i + seq_length] for i in range(0, len(stream) - seq_length + 1, seq_length)]
    return blocks


@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_blocks_match_a_reference_tokenization(model_type, tokenizers, tmp_path):
    tokenizer = tokenizers[model_type]
    dataset = data.load_split(data_args(tmp_path), "validation", tokenizer, 64)
    lines = VALID_TEXT.read_text().splitlines()
    expected = reference_blocks(lines[: -(-len(lines) * 10 // 100)], tokenizer, 64)
    assert dataset[:]["input_ids"].tolist() == expected
    first = tokenizer.cls_token_id if model_type == "bert" else tokenizer.bos_token_id
    assert (dataset[:]["input_ids"] == first).sum() > 10  # the special tokens are in the stream


@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_bos_first_blocks_frame_one_plain_stream(model_type, tokenizers, tmp_path):
    tokenizer = tokenizers[model_type]
    seq_length = 64
    args = data_args(tmp_path, block_layout="bos_first")
    blocks = data.load_split(args, "validation", tokenizer, seq_length)[:]["input_ids"]
    assert blocks.shape[1] == seq_length and len(blocks) > 100
    lines = VALID_TEXT.read_text().splitlines()[: -(-len(VALID_TEXT.read_text().splitlines()) * 10 // 100)]
    stream = [
        t for line in lines if line.strip() for t in tokenizer(line.strip(), add_special_tokens=False)["input_ids"]
    ]
    if model_type == "opt":  # </s> at position 0 and nowhere else
        first, body = tokenizer.bos_token_id, blocks[:, 1:]
        assert (blocks[:, 0] == first).all() and not (body == first).any()
    else:  # [CLS] body [SEP], as BERT's own pre-training sequences
        body = blocks[:, 1:-1]
        assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
        assert not torch.isin(body, torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])).any()
    body_length = body.shape[1]
    assert body.flatten().tolist() == stream[: len(blocks) * body_length]  # in order, nothing skipped
    assert len(stream) - len(blocks) * body_length < body_length  # only the tail is lost
    again = data.load_split(
        data_args(tmp_path, block_layout="bos_first", overwrite_cache=True), "validation", tokenizer, 64
    )
    assert torch.equal(again[:]["input_ids"], blocks)  # deterministic


def test_the_layout_is_part_of_the_cache_key(tokenizers, tmp_path):
    for layout in data.BLOCK_LAYOUTS:
        data.load_split(data_args(tmp_path, block_layout=layout), "validation", tokenizers["opt"], 32)
    caches = sorted((tmp_path / "cache").glob("validation-*"))
    assert len(caches) == 2
    layouts = {json.loads((c / "settings.json").read_text())["block_layout"] for c in caches}
    assert layouts == set(data.BLOCK_LAYOUTS)


def test_unknown_layout_lists_the_valid_ones(tokenizers, tmp_path):
    with pytest.raises(ValueError, match="Unknown block layout 'bos'; valid layouts: stream, bos_first"):
        data.load_split(data_args(tmp_path, block_layout="bos"), "validation", tokenizers["opt"], 32)


def test_a_long_text_is_split_into_blocks_not_truncated(tokenizers, tmp_path):
    long_line = " ".join(f"word{i}" for i in range(3000))
    path = tmp_path / "long.txt"
    path.write_text(long_line + "\n")
    tokenizer = tokenizers["opt"]
    dataset = data.load_split(
        data_args(tmp_path, validation_file=str(path), validation_percentage=None), "validation", tokenizer, 128
    )
    ids = tokenizer(long_line)["input_ids"]
    assert len(ids) > 1000
    assert len(dataset) == len(ids) // 128
    assert dataset[:]["input_ids"].flatten().tolist() == ids[: len(dataset) * 128]


def test_second_load_uses_the_cache_and_overwrite_rebuilds(tokenizers, tmp_path, monkeypatch):
    args = data_args(tmp_path)
    first = data.load_split(args, "validation", tokenizers["bert"], 32)

    def no_tokenizing(*_args, **_kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data, "_tokenize", no_tokenizing)
    assert torch.equal(
        data.load_split(args, "validation", tokenizers["bert"], 32)[:]["input_ids"], first[:]["input_ids"]
    )
    with pytest.raises(AssertionError, match="tokenized again"):  # a new setting is a new cache entry
        data.load_split(args, "validation", tokenizers["bert"], 16)
    with pytest.raises(AssertionError, match="tokenized again"):
        data.load_split(data_args(tmp_path, overwrite_cache=True), "validation", tokenizers["bert"], 32)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_validation_alone_never_reads_the_training_split(tokenizers, tmp_path):
    args = data_args(tmp_path, train_file=str(tmp_path / "missing.txt"))
    splits = data.prepare_splits(args, ("validation",), tokenizers["opt"], 32, Accelerator(cpu=True))
    assert list(splits) == ["validation"] and len(splits["validation"]) > 0
    assert not list((tmp_path / "cache").glob("train-*"))


def test_data_errors_name_the_fix(tokenizers, tmp_path):
    with pytest.raises(ValueError, match="No train data: pass --dataset_setup or --train_file"):
        data.check_data_sources(data_args(tmp_path, train_file=None), ("train",))
    with pytest.raises(ValueError, match="--dataset_setup and --train_file, --validation_file both choose"):
        data.check_data_sources(data_args(tmp_path, dataset_setup="wikitext_2"), ("train",))
    with pytest.raises(ValueError, match=r"--validation_percentage must lie in \(0, 100\]"):
        typed_group(data.DataArgs, {"validation_percentage": 0})
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    with pytest.raises(ValueError, match="fewer than 128 tokens"):
        data.load_split(data_args(tmp_path, validation_file=str(tiny)), "validation", tokenizers["opt"], 128)


def test_setups_name_existing_script_free_hub_datasets_and_the_shared_enwiki_slice():
    assert set(data_sources.DATASET_SETUPS) == {"wikitext_2", "wikitext_103", "bookcorpus_and_wiki", "enwiki_slice"}
    for splits in data_sources.DATASET_SETUPS.values():
        assert set(splits) == {"train", "validation"}
    hub = [
        source for splits in data_sources.DATASET_SETUPS.values() for sources in splits.values() for source in sources
    ]
    assert all("/" in source.path for source in hub if isinstance(source, data_sources.HubSource))
    assert all(
        source.path.is_file() for sources in data_sources.DATASET_SETUPS["enwiki_slice"].values() for source in sources
    )


def test_the_enwiki_slice_setup_reads_the_shared_folder_and_names_it_when_missing(tokenizers, tmp_path, monkeypatch):
    corpus = tmp_path / "shared" / "data" / "enwiki-slice"
    corpus.mkdir(parents=True)
    lines = {"train": [f"= Article {i} =\n" + f"word {i} " * 40 for i in range(3)], "validation": ["a text " * 60]}
    (corpus / "train.txt").write_text("\n".join(lines["train"]) + "\n")
    (corpus / "valid.txt").write_text("\n".join(lines["validation"]) + "\n")
    monkeypatch.setenv("OFT_SHARED", str(tmp_path / "shared"))
    args = data_args(tmp_path, dataset_setup="enwiki_slice", train_file=None, validation_file=None)
    args = data.DataArgs(**(vars(args) | {"validation_percentage": None}))
    data.check_data_sources(args, ("train", "validation"))
    for split in ("train", "validation"):
        text = (corpus / ("train.txt" if split == "train" else "valid.txt")).read_text().splitlines()
        blocks = data.load_split(args, split, tokenizers["opt"], 32)
        assert [list(b) for b in blocks["input_ids"]] == reference_blocks(text, tokenizers["opt"], 32)
    (corpus / "valid.txt").unlink()
    with pytest.raises(InputFileError, match=f"reads {corpus / 'valid.txt'}, which does not exist; set OFT_SHARED"):
        data.check_data_sources(args, ("validation",))
