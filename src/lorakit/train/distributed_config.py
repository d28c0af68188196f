"""Training on several machines: the rendezvous options passed to torchrun, and `--fsdp`.

One machine (the default) starts `torchrun --standalone` (launch.py). With `--nnodes N` every machine runs
the same `lorakit finetune|pretrain ... --nnodes N` command and torchrun joins them into one process group:

- static rendezvous, as torchrun documents it: `--node-rank R --master-addr HOST --master-port PORT`, where
  HOST is node 0's address and R this machine's number (0..N-1); node 0 holds global rank 0, which writes
  the adapter and the checkpoints (on node 0's disk, or on a shared file system).
- dynamic (c10d) rendezvous: `--rdzv-endpoint HOST:PORT` on every machine (no node rank: torchrun assigns
  them as the machines arrive).

The global batch is split over all processes of all machines (`--batch-size` = micro batch x accumulation x
processes), so the result does not depend on how many machines share the work.

`--fsdp` shards the frozen base weights, the LoRA weights and their optimizer state over the processes
(FSDP2 `fully_shard` per decoder layer, through accelerate) instead of one full copy per process; the
adapter is gathered to rank 0 and saved as usual. See docs/scaling.md for what was tested on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.config import opt
from lorakit.errors import ConfigError

DEFAULT_MASTER_PORT = 29500
RDZV_ID = "lorakit"


@dataclass
class DistributedOptions:
    nnodes: int = opt(1, "machines training together (each runs the same command with its own --node-rank)")
    node_rank: int = opt(0, "this machine's number, 0..nnodes-1 (node 0 writes the outputs); static rendezvous")
    master_addr: str = opt("", "address of node 0 for a static rendezvous (default: none; required with "
                               "--nnodes > 1 unless --rdzv-endpoint is given)")
    master_port: int = opt(DEFAULT_MASTER_PORT, "port on node 0 for the rendezvous")
    rdzv_endpoint: str = opt("", "HOST:PORT of a c10d rendezvous instead of --master-addr/--node-rank "
                                 "(default: none)")
    fsdp: bool = opt(False, "shard base weights, adapter and optimizer state over the processes (FSDP2), "
                            "instead of one full copy per process")

    def validate_distributed(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), "
                              f"got {self.node_rank}")
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port must be a port number, got {self.master_port}")
        if self.rdzv_endpoint and self.master_addr:
            raise ConfigError("give either --rdzv-endpoint or --master-addr, not both")
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ConfigError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.nnodes > 1 and not (self.master_addr or self.rdzv_endpoint):
            raise ConfigError(f"--nnodes {self.nnodes} needs the address of node 0: --master-addr HOST "
                              "(with --node-rank) or --rdzv-endpoint HOST:PORT")

    @property
    def multi_node(self) -> bool:
        """True when torchrun must join other machines (or a given rendezvous) rather than run standalone."""
        return self.nnodes > 1 or bool(self.master_addr or self.rdzv_endpoint)


def rendezvous_args(opts: DistributedOptions) -> list[str]:
    """torchrun's rendezvous flags for these options: --standalone on one machine."""
    if opts.rdzv_endpoint:
        return [f"--nnodes={opts.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={opts.rdzv_endpoint}",
                f"--rdzv-id={RDZV_ID}"]
    if opts.master_addr:
        return [f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}", f"--master-addr={opts.master_addr}",
                f"--master-port={opts.master_port}"]
    return ["--standalone"]
