"""Trainer callbacks: a JSON-lines training log and a loss plot (train and eval) in the output folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class JsonlLogCallback(TrainerCallback):
    """Append every Trainer log (loss, lr, eval_loss, ...) as one JSON line to `train_log.jsonl`."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class LogFinalStepCallback(TrainerCallback):
    """Log the last step too, whatever --logging-steps says.

    HF Trainer's training loss is the mean of the logged losses plus the loss since the last log; only the
    logged part is averaged over processes. Logging the last step leaves no unlogged tail, so under DDP the
    reported training loss is that of all processes (it was rank 0's share alone: 2.11 vs 2.07 measured)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


def loss_points(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) pairs of a Trainer log history."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    return train, evals


def plot_losses(points: tuple[list, list], path: Path) -> None:
    """Write a PNG of `loss_points`: the train loss curve and eval loss points (temp file, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = points
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


class LossPlotCallback(TrainerCallback):
    """Redraw `loss.png` at every checkpoint, so a killed run still has its curve; the engine calls
    `draw` once more after training (outside the timed training: the first plot of a process costs
    ~2.4 s on a small CPU, matplotlib's import and font set-up).

    A run that ends on a checkpoint step would draw the same curve twice in a row: it is drawn again only
    when its points have changed."""

    def __init__(self, path: Path):
        self.path = path
        self._drawn: tuple | None = None

    def draw(self, state) -> None:
        points = loss_points(state.log_history)
        if state.is_world_process_zero and (points != self._drawn or not self.path.exists()):
            plot_losses(points, self.path)
            self._drawn = points

    def on_save(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:  # the last step's checkpoint: the engine draws after training
            self.draw(state)
