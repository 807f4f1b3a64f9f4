"""Process-level helpers shared by the entry points and the streaming statistics: a fresh accelerator per job,
whether bf16 is native on this machine, log setup (quiet libraries on all but the main process), progress bars,
the launch check, the `--dry_run` report, the end of a job's processes, and one-collective reductions of many
accumulators across processes."""

from __future__ import annotations

import gc
import json
import logging
import os
from contextlib import contextmanager

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from .errors import UsageError

logger = logging.getLogger(__name__)


def start_accelerator(mixed_precision: str | None = None, **options) -> Accelerator:
    """The accelerator of one job. accelerate keeps its settings (mixed precision among them) in a process-wide
    singleton, so a second job in one process (the demo, the comparison, the tests) would silently run at the
    first job's precision, or be refused another one: its accelerator-level state is cleared first (the
    process group and device, in PartialState, are kept). `mixed_precision` None: the accelerate config's or
    ACCELERATE_MIXED_PRECISION's (no)."""
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, **options)


def native_bf16() -> bool:
    """Whether bf16 arithmetic is native here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX. Elsewhere
    (an AVX2-only CPU) torch emulates bf16 matmuls, several times slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's instruction-set probes
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def add_training_precision_flag(parser, job: str, note: str = "") -> None:
    """A script's `--mixed_precision auto|no|bf16` for its `job` (training, fine-tuning), resolved later by
    `training_precision`."""
    parser.add_argument(
        "--mixed_precision",
        default="auto",
        choices=["auto", "no", "bf16"],
        help=f"{job} precision (no: fp32; auto: bf16 autocast where bf16 is native, a GPU or a CPU with AVX512-BF16 "
        f"or AMX, else fp32, as an AVX2-only CPU emulates bf16 several times slower).{note}",
    )


def training_precision(choice: str) -> str:
    """A script's `--mixed_precision` choice for its training job: `auto` resolved on this machine (bf16 where
    it is native, else fp32 `no`); any other choice as given."""
    if choice != "auto":
        return choice
    return "bf16" if native_bf16() else "no"


@contextmanager
def reproducible_compilation():
    """While inside, inductor compiles (forward, and the backward it compiles lazily at the first backward) so
    that a compiled run follows the torch RNG state, which a checkpoint restores: dropout draws from torch's
    generator as eager code does (inductor's own RNG keeps offsets a checkpoint does not hold; without this a
    resumed run's losses drift from the third step on), and torch's deterministic algorithms are on (warn-only)
    where inductor honours them. With `CompiledModule`'s eager embeddings, a resumed compiled run repeats the
    uninterrupted one bit for bit, losses and weights."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch._inductor.config.patch(fallback_random=True):
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class CompiledModule(torch.nn.Module):
    """`torch.compile(module)`, sharing `module`'s weights and buffers, run under `reproducible_compilation`.
    Each job compiles afresh (dynamo's caches are reset, so what an earlier job in this process compiled never
    decides this job's kernels) with static shapes (a new shape compiles its own graph). What dynamo cannot
    trace runs eagerly between compiled graphs (a graph break costs speed, never a wrong number). A training
    job also runs its backward passes inside `reproducible_compilation`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        logger.info("torch.compile: the first batches compile (a minute or more on a CPU)")
        torch._dynamo.reset()
        for submodule in module.modules():
            if isinstance(submodule, torch.nn.Embedding) and not hasattr(submodule.forward, "_torchdynamo_disable"):
                # Inductor fuses an embedding's backward into the kernel before it as atomic adds from every
                # thread, so with 2+ threads the gradient's rounding depends on their timing (two identical runs
                # then differ by ~1e-9): the lookups stay eager, whose backward is deterministic.
                submodule.forward = torch.compiler.disable(submodule.forward, reason="deterministic embedding grad")
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, *args, **kwargs):
        with reproducible_compilation():
            return self.compiled(*args, **kwargs)


def setup_logging(accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()


def progress_bar(accelerator, iterable=None, **options) -> tqdm:
    """A tqdm bar on each machine's main process only. There it is left to tqdm's own switches (TQDM_DISABLE=1
    turns it off, e.g. for a log file): passing `disable` would override them."""
    if not accelerator.is_local_main_process:
        options["disable"] = True
    return tqdm(iterable, dynamic_ncols=True, **options)


def end_processes(accelerator) -> None:
    """A job's last step: wait for every process, then tear the process group down (a process left in it can hang
    at exit). A multi-process job first drops the accelerator's prepared objects and collects the garbage they
    leave while the group still lives: collected at interpreter exit instead, after the group, DDP's leftovers make
    torch's gloo teardown abort now and then (the main process: "terminate called without an active exception" in
    6 of 147 two-process exits of a minimal accelerate DDP script; in none of 179 with the collection first)."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.free_memory()
        gc.collect()  # free_memory collects before it drops its own references
    accelerator.end_training()


def check_launch(accelerator) -> None:
    """`accelerate launch --cpu --num_processes N` without MPI starts one process (with MASTER_ADDR set for the
    N it was asked for, but no WORLD_SIZE): refuse to run it as if it were N."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    asked_for_many = "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
    if launched_by_accelerate and asked_for_many and accelerator.num_processes == 1:
        raise UsageError(
            "accelerate launch was asked for several processes but started one (its CPU launcher needs MPI, "
            "--mpirun_hostfile); start them with: ACCELERATE_USE_CPU=true torchrun --nproc_per_node N SCRIPT ..."
        )


def print_dry_run(accelerator, summary: dict) -> dict:
    """`--dry_run`: the resolved run as JSON on stdout (main process only); returns `summary`."""
    if accelerator.is_main_process:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


def sum_across_processes(accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over processes, with one collective; returned on the host in the same shapes."""
    flat = accelerator.reduce(torch.cat([t.flatten() for t in tensors]), "sum").cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def max_across_processes(accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's elementwise maximum over processes, with one gather; returned on the host."""
    flat = accelerator.gather(torch.cat([t.flatten() for t in tensors]).view(1, -1)).amax(dim=0).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]
