"""The loss plot: drawn at checkpoints and after training, not twice in a row for the same points."""

from __future__ import annotations

from types import SimpleNamespace

from lorakit.train import callbacks


def test_loss_plot_is_redrawn_only_when_its_points_change(tmp_path, monkeypatch):
    drawn = []
    real = callbacks.plot_losses
    state = SimpleNamespace(is_world_process_zero=True, log_history=[{"step": 1, "loss": 2.0}], global_step=1,
                            max_steps=2)
    monkeypatch.setattr(callbacks, "plot_losses",  # records the log length at each draw
                        lambda points, path: drawn.append(len(state.log_history)) or real(points, path))
    cb = callbacks.LossPlotCallback(tmp_path / "loss.png")
    cb.on_save(None, state, None)
    state.global_step = 2
    state.log_history.append({"step": 2, "loss": 1.8})
    cb.on_save(None, state, None)  # the last step's checkpoint: left to the engine's draw after training
    assert drawn == [1]
    state.log_history.pop()
    state.log_history.append({"step": 2, "train_runtime": 3.0})  # the end-of-training summary: no new point
    cb.draw(state)
    assert drawn == [1] and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    state.log_history.append({"step": 2, "eval_loss": 1.5})  # a new point: drawn again
    cb.draw(state)
    (tmp_path / "loss.png").unlink()  # a missing plot is always redrawn
    cb.draw(state)
    assert drawn == [1, 3, 3] and (tmp_path / "loss.png").exists()
