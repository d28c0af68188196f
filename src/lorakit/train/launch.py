"""`--nproc N|auto`: re-run a training verb as N data-parallel processes through torchrun.

The options are written to a temporary YAML file (with nproc set to 1) and the verb is started as
`python -m torch.distributed.run --standalone --nproc-per-node N -m lorakit <verb> options.yaml`,
exactly what a user would type by hand. `--standalone` picks a free rendezvous port, so two runs on
one machine do not collide. Each worker then sees WORLD_SIZE/RANK and HF Trainer sets up DDP (gloo
on CPU, nccl on GPUs); the engine divides gradient accumulation by the number of processes.

`auto` (the default) trains on a CPU-only machine with one process per core, each with one thread
(faster than one process with a thread per core: docs/performance.md#one-process-per-core).
Each process holds its own copy of the model and the workers' start-up costs ~2 s, so `auto` stays at
one process for short jobs, when the copies would not fit in memory, when the batch does not split, and
on GPUs (where one process per GPU is the user's choice of devices: `--nproc N` or torchrun).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.config import save_yaml
from lorakit.errors import ConfigError, LorakitError
from lorakit.machine import available_memory, usable_cores
from lorakit.train.config import gradient_accumulation_steps
from lorakit.train.distributed_config import DistributedOptions, rendezvous_args

if TYPE_CHECKING:
    from lorakit.train.summary import TrainSummary

log = logging.getLogger("lorakit")

# Below ~25 s of single-process training (6 x parameters x tokens FLOPs at the ~350 GFLOP/s this 2-core
# CPU sustains) the ~2 s of extra start-up outweigh the gain (docs/performance.md#one-process-per-core).
MIN_AUTO_WORK_FLOP = 8e12
# Resident memory of one training process besides the weights (runtime, activations at micro-batch 4 x 256,
# LoRA optimizer state): measured 1.5 GB (docs/performance.md#one-process-per-core).
PROCESS_OVERHEAD_BYTES = 1.6 * 2**30
BYTES_PER_TOKEN = 4  # of alpaca-style JSON or raw text on disk, for the size of a job before tokenizing


def under_launcher() -> bool:
    """True inside a torchrun / accelerate launch worker."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def torchrun_command(verb: str, config_file: str | os.PathLike[str], nproc: int,
                     nodes: DistributedOptions | None = None) -> list[str]:
    """`torchrun` for `nproc` processes on this machine: --standalone, or the rendezvous of `nodes`."""
    rendezvous = rendezvous_args(nodes) if nodes is not None else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc}",
            "-m", "lorakit", *verb.split(), str(config_file)]


def worker_env(nproc: int, cpu_count: int | None = None) -> dict[str, str]:
    """The environment of the workers: on CPU, share the cores instead of torchrun's OMP_NUM_THREADS=1."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (cpu_count or usable_cores()) // nproc))
    return env


def data_bytes(path: str) -> int:
    """Bytes on disk of a data file, or of all files under a folder (the job's size before tokenizing)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return 0


def training_work(cfg: Any, n_params: int) -> float:
    """Rough FLOPs of the job (6 x parameters x tokens), from the data's size on disk."""
    tokens = data_bytes(cfg.data_path) / BYTES_PER_TOKEN * cfg.num_epochs
    if cfg.max_steps > 0:
        row = getattr(cfg, "cutoff_len", None) or getattr(cfg, "block_size", 512)
        tokens = min(tokens, cfg.max_steps * cfg.batch_size * row)
    return 6.0 * n_params * tokens


def auto_nproc(cfg: Any, n_params: int, weight_bytes: int, cores: int, available: int, has_gpu: bool,
               full_params: int = 0) -> tuple[int, str]:
    """(processes, why) for --nproc auto: the most processes, up to one per core, that fit and pay off.

    `full_params`: parameters trained fully (--modules-to-save), each with an fp32 copy, gradient and two
    AdamW moments (16 bytes) in every process."""
    if has_gpu:
        return 1, "a GPU is present (several GPUs: --nproc N or torchrun)"
    if cores < 2:
        return 1, "one core"
    work = training_work(cfg, n_params)
    if work < MIN_AUTO_WORK_FLOP:
        return 1, f"a short job (~{work / 1e12:.1f} TFLOP): a second process would not pay for its start-up"
    per_process = n_params * weight_bytes + 16 * full_params + PROCESS_OVERHEAD_BYTES
    splits = [n for n in range(cores, 1, -1) if cfg.batch_size % (cfg.micro_batch_size * n) == 0]
    if not splits:
        return 1, (f"--batch-size {cfg.batch_size} does not split into micro-batches of {cfg.micro_batch_size} "
                   f"over 2..{cores} processes")
    for n in splits:
        if n * per_process <= 0.8 * available:
            return n, f"{cores} cores, ~{work / 1e12:.0f} TFLOP of work, {n} x {per_process / 2**30:.1f} GB fits"
    return 1, (f"{splits[-1]} copies of {per_process / 2**30:.1f} GB would not fit in the "
               f"{available / 2**30:.1f} GB available")


def _fully_trained_params(model_dir: Path, modules: list[str]) -> int:
    """Parameters of the embedding / output layers trained fully (pretrain's default, or after a vocab resize)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    rows_x_width = int(config.get("vocab_size", 0)) * int(config.get("hidden_size", 0))
    return rows_x_width * sum(name in ("embed_tokens", "lm_head") for name in modules)


def resolve_nproc(cfg: Any) -> int:
    """cfg.nproc as a number of processes (auto decided here, on this machine)."""
    if cfg.nproc != "auto":
        return int(cfg.nproc)
    if getattr(cfg, "nnodes", 1) > 1:  # every machine must start the same number: auto could differ between them
        log.info("--nproc auto: 1 process on this machine (--nnodes %d: give --nproc N for more)", cfg.nnodes)
        return 1
    if getattr(cfg, "quantization", "none") != "none":
        log.info("--nproc auto: 1 process (a quantized base trains in one process)")
        return 1
    import torch

    from lorakit.formats.safetensors_io import param_count
    from lorakit.models import resolve_model_dir
    from lorakit.precision import resolve_precision

    try:
        model_dir = resolve_model_dir(cfg.base_model)
        n_params = param_count(model_dir)
        full_params = _fully_trained_params(model_dir, cfg.modules_to_save)
    except Exception as e:  # noqa: BLE001 - not a safetensors folder: train as one process, as asked of auto
        log.info("--nproc auto: 1 process (parameter count unknown: %s)", e)
        return 1
    weight_bytes = 4 if resolve_precision(cfg.precision) == "fp32" else 2
    n, why = auto_nproc(cfg, n_params, weight_bytes, usable_cores(), available_memory(), torch.cuda.is_available(),
                        full_params)
    log.info("--nproc auto: %d process%s (%s)", n, "es" if n > 1 else "", why)
    return n


def relaunch_if_needed(cfg: Any, verb: str) -> int | None:
    """Run `verb` with `cfg` as several processes and return the exit code; None when not needed.

    Not needed when one process is chosen or when already inside a launcher."""
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        if cfg.nproc != "auto" and int(cfg.nproc) not in (1, world):
            raise ConfigError(f"--nproc {cfg.nproc} given inside a launcher that started {world} process(es); "
                              "drop --nproc when using torchrun or accelerate launch")
        return None
    nproc = resolve_nproc(cfg)
    multi_node = getattr(cfg, "multi_node", False)
    if nproc <= 1 and not multi_node:
        return None
    # refuse bad splits up front (the batch is split over the processes of all machines)
    gradient_accumulation_steps(cfg.batch_size, cfg.micro_batch_size, nproc * getattr(cfg, "nnodes", 1))
    with tempfile.TemporaryDirectory(prefix="lorakit-launch-") as tmp:
        config_file = Path(tmp) / "options.yaml"
        save_yaml(dataclasses.replace(cfg, nproc="1"), config_file)
        command = torchrun_command(verb, config_file, nproc, cfg if multi_node else None)
        where = f" on node {cfg.node_rank} of {cfg.nnodes}" if multi_node else ""
        log.info("launching %d process%s%s: %s", nproc, "es" if nproc > 1 else "", where, " ".join(command))
        return subprocess.run(command, env=worker_env(nproc), check=False).returncode


def train_as_configured(cfg: Any, verb: str, train_here: Callable[[Any], TrainSummary]) -> TrainSummary:
    """Train with as many processes as cfg.nproc says and return the summary: `train_here(cfg)` in this
    process, or `lorakit <verb>` under torchrun, whose rank 0 wrote the summary to the output folder."""
    code = relaunch_if_needed(cfg, verb)
    if code is None:
        return train_here(cfg)
    if code:
        raise LorakitError(f"lorakit {verb} failed in one of its processes (exit code {code}); see above")
    from lorakit.train.summary import read_summary

    return read_summary(cfg.output_dir)
