"""`--nproc N`: re-run a training verb as N data-parallel processes through torchrun.

The options are written to a temporary YAML file (with nproc reset to 1) and the verb is started as
`python -m torch.distributed.run --standalone --nproc-per-node N -m lorakit <verb> options.yaml`,
exactly what a user would type by hand. `--standalone` picks a free rendezvous port, so two runs on
one machine do not collide. Each worker then sees WORLD_SIZE/RANK and HF Trainer sets up DDP (gloo
on CPU, nccl on GPUs); the engine divides gradient accumulation by the number of processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lorakit.config import save_yaml
from lorakit.errors import ConfigError

log = logging.getLogger("lorakit")


def under_launcher() -> bool:
    """True inside a torchrun / accelerate launch worker."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def torchrun_command(verb: str, config_file: str | os.PathLike[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorakit", *verb.split(), str(config_file)]


def worker_env(nproc: int, cpu_count: int | None = None) -> dict[str, str]:
    """The environment of the workers: on CPU, share the cores instead of torchrun's OMP_NUM_THREADS=1."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (cpu_count or os.cpu_count() or 1) // nproc))
    return env


def relaunch_if_needed(cfg: Any, verb: str) -> int | None:
    """Run `verb` with `cfg` as cfg.nproc processes and return the exit code; None when not needed.

    Not needed when nproc is 1 or when already inside a launcher with the same number of processes.
    """
    nproc = getattr(cfg, "nproc", 1)
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        if nproc > 1 and nproc != world:
            raise ConfigError(f"--nproc {nproc} given inside a launcher that started {world} process(es); "
                              "drop --nproc when using torchrun or accelerate launch")
        return None
    if nproc <= 1:
        return None
    from lorakit.train.engine import gradient_accumulation_steps

    gradient_accumulation_steps(cfg.batch_size, cfg.micro_batch_size, nproc)  # refuse bad splits up front
    with tempfile.TemporaryDirectory(prefix="lorakit-launch-") as tmp:
        config_file = Path(tmp) / "options.yaml"
        save_yaml(dataclasses.replace(cfg, nproc=1), config_file)
        command = torchrun_command(verb, config_file, nproc)
        log.info("launching %d processes: %s", nproc, " ".join(command))
        return subprocess.run(command, env=worker_env(nproc), check=False).returncode
