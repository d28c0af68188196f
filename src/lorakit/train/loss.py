"""Next-token cross-entropy without [N, V] logits: transformers' ForCausalLMLoss, cheaper.

transformers upcasts the whole [N, V] logits to fp32 before `cross_entropy` and keeps the fp32
log-softmax for the backward pass; accelerate copies the returned logits to fp32 once more. With a
49k vocabulary that is several 69-138 MB tensors per 700-token micro-batch, each freshly allocated
(page faults: ~16k per tensor) and touched once or twice.

Training (`LinearCrossEntropy`): the lm_head and the loss run together over blocks of rows in a
reused workspace, so the logits exist one block at a time; rows whose label is ignored (a masked
prompt, the last token of each example, pad) get no logits at all. Its gradient for the hidden
states is computed in the forward pass (it only needs that block's probabilities) and scaled by the
incoming per-token gradient in the backward (figures: docs/performance.md#the-lm_head-fused-with-the-loss).

Evaluation, or a trainable lm_head (`ChunkedCrossEntropy`): the logits are computed as usual and read
one block of rows at a time, the softmax recomputed in the backward pass.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.models.families import classes

# Causal LMs whose forward hands lm_head's output straight to loss_function (no soft-capping or
# scaling of the logits in between), so the two can run fused: the registry's `fused_head_loss`.
FUSABLE_MODELS = classes("architecture", "fused_head_loss")


def _rows_per_block(vocab_size: int, device: torch.device) -> int:
    """CPU: ~2 MB of fp32 per block stays in L2 between reading and writing it (measured best here: 32
    rows at a 16k vocabulary, 8 at 49k and 128k). GPU: blocks of ~128 MB keep kernel launches few."""
    elements = 1 << 19 if device.type == "cpu" else 1 << 25
    return min(4096, max(8, elements // vocab_size))


def _head_rows_per_block(vocab_size: int) -> int:
    """Most rows of one fused lm_head block: the [R, H] x [H, V] matmul needs a few hundred rows to run at
    full speed (measured here at 49k: 64 rows 1.5x slower than 256, 256 as fast as 700), and blocks
    of up to 256 rows ran fastest on one core (200 GFLOP/s, against 177-186 at 320-384 rows)."""
    return min(256, max(16, (1 << 24) // vocab_size))


def even_block_rows(n_rows: int, max_rows: int) -> int:
    """Rows per block when `n_rows` are cut into the fewest blocks of <= max_rows, all about as large: a
    ragged last block of a few rows runs the matmul at a fraction of its speed (700 rows in blocks of
    341: 341 + 341 + 18 rows at 176 GFLOP/s; 234 + 234 + 232 at 199)."""
    if n_rows == 0:
        return max_rows
    return -(-n_rows // -(-n_rows // max_rows))


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


def _target_nll(probs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row from fp32 softmax probabilities [R, V] (one pass less over the block than a
    log-softmax followed by exp: 5% of the fused head's time). A target probability below 1e-30 (a loss
    above 69 nats, near fp32's underflow at ~1e-38) is taken from its row's logits [R, V] instead."""
    picked = probs.gather(1, targets[:, None])[:, 0]
    nll = picked.log().neg_()
    tiny = torch.nonzero(picked < 1e-30).flatten()
    if tiny.numel():
        exact = torch.log_softmax(logits[tiny].float(), dim=-1).gather(1, targets[tiny, None])[:, 0].neg_()
        nll.index_copy_(0, tiny, exact)
    return nll


class LinearCrossEntropy(torch.autograd.Function):
    """hidden [N, H], frozen weight [V, H], targets [N] -> per-token loss [N] in fp32, 0 where ignored.

    Equal to cross_entropy(hidden @ weight.T, targets) per token, computed in the dtype autocast would
    use for the matmul (log-softmax and probabilities in fp32, as transformers does). `head` is the
    `FusedLMHead` whose workspace holds one block of logits; no gradient flows to `weight`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                head: FusedLMHead) -> torch.Tensor:
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        rows = torch.nonzero(targets != ignore_index).flatten()
        h, t, w = hidden.index_select(0, rows).to(dtype), targets[rows], weight.to(dtype)
        row_losses = torch.empty(len(rows), dtype=torch.float32, device=device)
        grad_rows = torch.empty_like(h)  # d loss_i / d hidden_i, before the incoming gradient
        logits_buf, probs_buf = head.workspace(w.shape[0], dtype, device)
        block = even_block_rows(len(rows), logits_buf.shape[0])
        offsets = torch.arange(block, device=device)
        for start in range(0, len(rows), block):
            end = min(start + block, len(rows))
            logits = torch.mm(h[start:end], w.t(), out=logits_buf[: end - start])
            probs = probs_buf[: end - start]
            probs.copy_(logits)
            torch.softmax(probs, dim=-1, out=probs)  # in place: each row is read whole before it is written
            row_losses[start:end] = _target_nll(probs, logits, t[start:end])
            probs[offsets[: end - start], t[start:end]] -= 1.0  # d loss / d logits = p - onehot
            logits.copy_(probs)
            torch.mm(logits, w, out=grad_rows[start:end])
        ctx.save_for_backward(rows, grad_rows)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return torch.zeros(len(targets), dtype=torch.float32, device=device).index_copy_(0, rows, row_losses)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        rows, grad_rows = ctx.saved_tensors
        scaled = (grad_rows.float() * grad_losses[rows, None].float()).to(ctx.hidden_dtype)
        grad = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=grad_rows.device)
        return grad.index_copy_(0, rows, scaled), None, None, None, None


class FusedLMHead(nn.Linear):
    """Stands in for a bias-free lm_head (same weight Parameter, same state-dict key). While `defer` is
    set (a training forward with labels, see `install_training_loss`) it passes the hidden states
    through and `causal_lm_loss` computes logits and loss together."""

    def __init__(self, head: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, None
        self.defer = False
        self._workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.defer else super().forward(hidden)

    def workspace(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of logits [R, V] in `dtype` and of fp32 probabilities, kept between steps (fresh
        tensors of this size cost page faults each time)."""
        key = (vocab_size, dtype, device)
        if key not in self._workspaces:
            rows = _head_rows_per_block(vocab_size)
            self._workspaces[key] = (torch.empty(rows, vocab_size, dtype=dtype, device=device),
                                     torch.empty(rows, vocab_size, dtype=torch.float32, device=device))
        return self._workspaces[key]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                   shift_labels: torch.Tensor | None = None, head: FusedLMHead | None = None,
                   **kwargs) -> torch.Tensor:
    """Drop-in for transformers' ForCausalLMLoss (same arguments, same reduction): logits [B, T, V],
    labels [B, T]; the sum over predicted tokens divided by num_items_in_batch, else their mean.

    With a deferring `head`, `logits` are the hidden states [B, T, H] it passed through."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    if head is not None and head.defer:
        hidden = logits.reshape(-1, logits.shape[-1])
        losses = LinearCrossEntropy.apply(hidden, head.weight, targets, ignore_index, head)
    else:
        losses = ChunkedCrossEntropy.apply(logits.reshape(-1, vocab_size), targets, ignore_index)
    if num_items_in_batch is None:
        return losses.sum() / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses.sum() / num_items_in_batch


def _defer_head(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: fuse head and loss for a training forward that computes a loss with a frozen head."""
    head = module.get_output_embeddings()
    if isinstance(head, FusedLMHead):
        head.defer = (module.training and torch.is_grad_enabled() and kwargs.get("labels") is not None
                      and not kwargs.get("logits_to_keep") and not head.weight.requires_grad)


def _without_logits(module: nn.Module, args, kwargs, output):
    """Forward hook: a training forward that computed its loss returns it without the logits."""
    head = module.get_output_embeddings()
    if isinstance(head, FusedLMHead):
        head.defer = False
    if not module.training or getattr(output, "loss", None) is None or getattr(output, "logits", None) is None:
        return output
    return type(output)(**{k: v for k, v in output.items() if k != "logits"})


def install_training_loss(model: nn.Module) -> bool:
    """Use `causal_lm_loss` for a causal LM, fused with its lm_head where the architecture allows, and
    let its training forwards return no logits.

    The Trainer reads only the loss of a training step, but under bf16 accelerate copies every
    output tensor to fp32: for the logits a [N, V] fp32 copy per micro-batch (138 MB and ~40 ms
    at 700 tokens x 49k). Evaluation (module.eval()) keeps the logits. Returns whether installed."""
    if getattr(model, "loss_type", None) != "ForCausalLM":
        return False
    head = model.get_output_embeddings()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if type(model).__name__ in FUSABLE_MODELS and type(head) is nn.Linear and head.bias is None and softcap is None:
        head = FusedLMHead(head)
        model.set_output_embeddings(head)
        model.register_forward_pre_hook(_defer_head, with_kwargs=True)
    model.loss_function = functools.partial(causal_lm_loss, head=head if isinstance(head, FusedLMHead) else None)
    model.register_forward_hook(_without_logits, with_kwargs=True)
    return True
