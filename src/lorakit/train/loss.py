"""Next-token cross-entropy that never holds fp32 logits: transformers' ForCausalLMLoss, cheaper.

transformers upcasts the whole [N, V] logits to fp32 before `cross_entropy` and keeps the fp32
log-softmax for the backward pass. With a 49k vocabulary that is 2 x 138 MB per 700-token
micro-batch and, measured on SmolLM2-135M under bf16 (2 cores), about 245 ms of copies, fills and
log-softmax per micro-batch next to 290 ms for the lm_head matmuls themselves. `ChunkedCrossEntropy`
reads the logits in their own dtype a block of rows at a time, computes in fp32 (the same
log-softmax and the same fp32 gradient, rounded once to the logits' dtype) and recomputes the
softmax in the backward pass instead of keeping it: about 80 ms instead of 255 ms per micro-batch.
"""

from __future__ import annotations

import torch

from lorakit.data.tokenize import IGNORE_INDEX


def _rows_per_block(vocab_size: int, device: torch.device) -> int:
    """CPU: ~2 MB of fp32 per block stays in L2 between reading and writing it (measured best here: 32
    rows at a 16k vocabulary, 8 at 49k and 128k). GPU: blocks of ~128 MB keep kernel launches few."""
    elements = 1 << 19 if device.type == "cpu" else 1 << 25
    return min(4096, max(8, elements // vocab_size))


class ChunkedCrossEntropy(torch.autograd.Function):
    """logits [N, V] (any float dtype), targets [N] -> per-token loss [N] in fp32, 0 where ignored.

    Each block of rows goes through one fused log-softmax (forward) or softmax (backward) that reads
    the logits in their dtype and writes fp32; nothing of size [N, V] is kept for the backward pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        block_rows = _rows_per_block(logits.shape[1], logits.device)
        for start in range(0, logits.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            log_probs = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)
            losses[rows] = log_probs.gather(1, safe_targets[rows, None])[:, 0].neg_()
        ctx.save_for_backward(logits, safe_targets, valid)
        return losses.masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, valid = ctx.saved_tensors
        scale = torch.where(valid, grad_losses.float(), 0.0)
        grad = torch.empty_like(logits)
        block_rows = _rows_per_block(logits.shape[1], logits.device)
        for start in range(0, logits.shape[0], block_rows):
            end = min(start + block_rows, logits.shape[0])
            block = torch.softmax(logits[start:end], dim=-1, dtype=torch.float32)  # d loss / d logits = p - onehot
            block[torch.arange(end - start, device=logits.device), targets[start:end]] -= 1.0
            torch.mul(block, scale[start:end, None], out=grad[start:end])  # rounded once to the logits' dtype
        return grad, None, None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                   shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Drop-in for transformers' ForCausalLMLoss (same arguments, same reduction): logits [B, T, V],
    labels [B, T]; the sum over predicted tokens divided by num_items_in_batch, else their mean."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    losses = ChunkedCrossEntropy.apply(logits.reshape(-1, vocab_size), targets, ignore_index)
    if num_items_in_batch is None:
        return losses.sum() / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses.sum() / num_items_in_batch


def _without_logits(module: torch.nn.Module, args, kwargs, output):
    """Forward hook: a training forward that computed its loss returns it without the logits."""
    if not module.training or getattr(output, "loss", None) is None or getattr(output, "logits", None) is None:
        return output
    return type(output)(**{k: v for k, v in output.items() if k != "logits"})


def install_training_loss(model: torch.nn.Module) -> bool:
    """Use `causal_lm_loss` for a causal LM and let its training forwards return no logits.

    The Trainer reads only the loss of a training step, but under bf16 accelerate copies every
    output tensor to fp32: for the logits a [N, V] fp32 copy per micro-batch (138 MB and ~40 ms
    at 700 tokens x 49k). Evaluation (module.eval()) keeps the logits. Returns whether installed."""
    if getattr(model, "loss_type", None) != "ForCausalLM":
        return False
    model.loss_function = causal_lm_loss
    model.register_forward_hook(_without_logits, with_kwargs=True)
    return True
