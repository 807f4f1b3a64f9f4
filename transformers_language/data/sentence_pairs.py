"""The sentence-pair modality (GLUE, BERT with a classifier): token ids of one sentence or a pair, each example at
its own length, batches padded to their longest with an attention mask. The jobs ask it what they ask the text
and image modalities (modalities.py): flags, sources, tokenizer, the task's labels in the config, splits."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..errors import UsageError
from ..evaluation.probe_views import TextInputs
from ..families import Family
from ..glue_tasks import TASK_KEY
from ..models.loading import ModelArgs, check_sequence_length, check_tokenizer_fits, load_tokenizer
from .glue import GlueDataArgs, add_glue_data_args, check_glue_sources, get_task, load_examples, tokenize_examples

DEFAULT_MAX_SEQ_LENGTH = 128  # HF run_glue's


class SentencePairModality:
    """GLUE examples: token ids of a sentence (pair), a class or a score each."""

    omitted_model_flags = ("image_processor_name",)
    samples_with_seeds = False

    def add_data_args(self, parser, family: Family, training: bool) -> None:
        add_glue_data_args(parser, family.sequence)

    def check_sources(self, data: GlueDataArgs, splits: tuple[str, ...]) -> tuple[GlueDataArgs, None]:
        check_glue_sources(data, splits)
        return data, None

    def resolve_layout(self, data: GlueDataArgs, checkpoint: str | None) -> tuple[GlueDataArgs, None]:
        return data, None

    def load_preprocessor(self, model: ModelArgs):
        return load_tokenizer(model)

    def configure(self, config: PretrainedConfig, tokenizer, data: GlueDataArgs, classes, source: str | None) -> None:
        """The task's labels in the config (a pre-trained checkpoint gets them; a fine-tuned one must have been
        fine-tuned on this task); from scratch, the tokenizer's vocabulary."""
        task = get_task(data.task_name)
        tuned = getattr(config, TASK_KEY, None)
        if tuned is not None and tuned != data.task_name:
            raise UsageError(
                f"{source} was fine-tuned on {tuned}, not {data.task_name}; pass --task_name {tuned}, or start from a "
                "pre-trained checkpoint."
            )
        if source is None:
            config.vocab_size = len(tokenizer)
            config.pad_token_id = tokenizer.pad_token_id
        else:
            check_tokenizer_fits(tokenizer, config, source)
        names = task.labels or ("score",)
        config.num_labels = task.num_labels
        config.id2label = dict(enumerate(names))
        config.label2id = {name: index for index, name in enumerate(names)}
        config.problem_type = "regression" if task.labels is None else "single_label_classification"
        setattr(config, TASK_KEY, data.task_name)

    def sequence_length(self, data: GlueDataArgs, model: ModelArgs, config: PretrainedConfig, flag: str) -> int:
        if data.seq_length is None:
            return min(DEFAULT_MAX_SEQ_LENGTH, config.max_position_embeddings)
        check_sequence_length(config, data.seq_length, flag)
        return data.seq_length

    def tokens(self, seq_length: int, config: PretrainedConfig) -> int:
        return seq_length

    def prepare_splits(self, plan, accelerator, training: bool) -> dict:
        """Each split's examples, tokenized (the main process first, then the others, as HF caches); outside
        training, the training split only gives calibration samples, so its examples are tokenized as read."""
        data, task = plan.data, get_task(plan.data.task_name)
        splits = {}
        with accelerator.main_process_first():
            for split in plan.splits:
                examples = load_examples(data, split)
                lazy = not training and split == "train"
                splits[split] = tokenize_examples(
                    examples, task, plan.preprocessor, plan.seq_length, data.pad_to_max_length, lazy
                )
        return splits

    def records(self, data: GlueDataArgs) -> dict[str, dict]:
        return {}

    def probe_inputs(self, preprocessor, config: PretrainedConfig) -> TextInputs:
        return TextInputs(preprocessor, config)
