"""Cross-entropy of the output layer without its full logits.

At a large vocabulary the logits are the biggest tensor of a training step (2048 tokens x 128256
entries are 1 GiB in fp32), and autograd keeps about three of their size alive at once (logits,
log-probabilities, their gradient). :func:`linear_cross_entropy` takes the final hidden states and
the output layer instead and walks the tokens in chunks: for each chunk it computes the logits,
the losses and, right away, the gradients of the loss with respect to the hidden states, the
weight and the bias, then frees the chunk. Backward only scales those gradients, so no logits are
ever recomputed. This is the fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024, "Liger
Kernel: Efficient Triton Kernels for LLM Training", arXiv:2410.10989) and of Wijmans et al. 2024,
"Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009), in plain PyTorch ops.

Liger's kernel is not called even where it is installed: its gradients-in-forward path returns
only the reduced loss, and its ``reduction="none"`` (the per-token losses we also return) either
recomputes the logits in backward (current releases) or mis-scaled the weight gradient (older
ones). Either way the per-token losses would cost one more logits matmul per chunk, which is more
than a fused kernel could save over the three matmuls done here.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100  # a target that is not predicted (PyTorch's and transformers' convention)

# Bytes of one chunk's fp32 logits when ``chunk_tokens`` is not given, and the fewest tokens a
# chunk takes whatever the vocabulary. On the CPU narrower matmuls run markedly slower: at a 128k
# vocabulary (the shape of benchmarks/loss_memory.py, 2 cores) forward and backward took 1.29x
# the time of full logits with 128-token chunks (64 MiB), 1.02-1.20x with 256 and 1.04x with 512;
# with 256 tokens (128 MiB) the loss adds 0.07x the memory of full logits. On an
# accelerator every chunk also reads and writes the whole fp32 weight gradient once, which with a
# few hundred tokens per chunk would cost more time than the chunk's matmuls: 1 GiB keeps those
# compute-bound (an estimate from an H100's bandwidth and FLOP/s, not a measurement).
CPU_LOGITS_BUDGET = 64 * 2**20
ACCELERATOR_LOGITS_BUDGET = 2**30
MIN_CHUNK_TOKENS = 256

# CUDA GEMMs of 16-bit operands with an fp32 result, added in place (PyTorch pull 150812); whether
# a release accepts an fp32 accumulator with 16-bit operands is probed once (_fp32_out_gemm).
_FP32_OUT_GEMM = hasattr(torch.ops.aten.addmm, "dtype_out")


def default_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk: as many as the device's budget of fp32 logits holds, at least
    :data:`MIN_CHUNK_TOKENS` (at a 128k vocabulary: 256 on the CPU, 2092 on an accelerator)."""
    budget = CPU_LOGITS_BUDGET if device.type == "cpu" else ACCELERATOR_LOGITS_BUDGET
    return max(MIN_CHUNK_TOKENS, budget // (4 * vocab_size))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` x the summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``.

    ``hidden`` is (N, H), ``weight`` (V, H) (it may be tied to the input embeddings), ``bias``
    (V,), ``targets`` (N,) int64 with :data:`IGNORE_INDEX` where no token is predicted. Softmax
    and losses are computed in fp32 whatever the inputs' dtype; the matmuls with ``weight`` run in
    its dtype, and the weight's gradient is accumulated in fp32. ``chunk_tokens`` counts the
    predicted tokens taken at once (default: :func:`default_chunk_tokens`).

    Returns (loss, per_token): the 0-dim fp32 loss, differentiable, and the (N,) fp32 losses of
    each token, detached, 0 where ignored. The loss's graph holds the finished gradients and hands
    them over, so it can be backpropagated once (a second backward after ``retain_graph`` raises).
    """
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], weight.device)
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, scale, chunk)
    per_token, _ = _chunked_pass(hidden, weight, bias, targets, scale, chunk, wants=(False, False, False))
    return per_token.sum() * scale, per_token


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Gradients made in the forward pass, handed over (scaled) in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk):
        wants = tuple(ctx.needs_input_grad[:3])
        per_token, grads = _chunked_pass(hidden, weight, bias, targets, scale, chunk, wants)
        # kept in the inputs' dtypes until the backward: a 16-bit weight's fp32 accumulator goes now
        ctx.grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias))]
        ctx.mark_non_differentiable(per_token)
        return per_token.sum() * scale, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: its backward can run only once (no retain_graph)")
        grads, ctx.grads = ctx.grads, None  # scaled in place below: a second use would be wrong
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return *scaled, None, None, None


def _chunked_pass(hidden, weight, bias, targets, scale, chunk, wants):
    """(per-token losses, [grad of hidden, weight, bias] of ``scale`` x their sum, None where not
    in ``wants``). Only predicted tokens are computed: ignored ones add nothing to either."""
    want_hidden, want_weight, want_bias = wants
    per_token = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)
    grads = [
        torch.zeros_like(hidden) if want_hidden else None,
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None,
        torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None,
    ]
    for rows in torch.nonzero(targets != IGNORE_INDEX).squeeze(1).split(chunk):
        _chunk(hidden.index_select(0, rows), weight, bias, targets.index_select(0, rows), scale, rows, per_token, grads)
    return per_token, grads


def _chunk(h, weight, bias, targets, scale, rows, per_token, grads):
    """Write one chunk's losses into ``per_token`` and add its gradients into ``grads``; its
    logits die when this returns, before the next chunk allocates its own."""
    logits = (h.to(weight.dtype) @ weight.T).float()
    if bias is not None:
        logits += bias
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(1, keepdim=True)
    exp = logits.sub_(top).exp_()  # in place: the chunk holds a single (tokens, V) fp32 buffer
    total = exp.sum(1, keepdim=True)
    per_token.index_copy_(0, rows, (top + total.log()).squeeze(1) - target_logits)
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is None and grad_weight is None and grad_bias is None:
        return
    # d(scale * loss) / d logits = scale * (softmax - one-hot of the target)
    dlogits = exp.mul_(scale / total)
    dlogits[torch.arange(len(targets), device=targets.device), targets] -= scale
    if grad_hidden is not None:
        grad_hidden.index_copy_(0, rows, (dlogits.to(weight.dtype) @ weight).to(grad_hidden.dtype))
    if grad_weight is not None:
        _add_transposed_product(grad_weight, dlogits, h, weight.dtype)
    if grad_bias is not None:
        grad_bias += dlogits.sum(0)


def _add_transposed_product(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, dtype: torch.dtype) -> None:
    """``acc += dlogits.T @ h`` into the fp32 (V, H) ``acc`` in place, with no temporary of its size.

    A 16-bit output layer on CUDA multiplies in its dtype straight into fp32 (tensor cores); the
    CPU and fp32 layers multiply in fp32, which costs only chunk-sized casts.
    """
    if acc.is_cuda and dtype in (torch.bfloat16, torch.float16) and _fp32_out_gemm(acc.device, dtype):
        torch.addmm(acc, dlogits.T.to(dtype), h.to(dtype), out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(dlogits.T, h.float())


@functools.cache
def _fp32_out_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this PyTorch multiplies ``dtype`` operands into an fp32 accumulator in place on ``device``
    (releases differ in the dtypes they accept); else the product is taken in fp32."""
    if not _FP32_OUT_GEMM:
        return False
    acc = torch.zeros(2, 2, device=device)
    operand = torch.ones(2, 2, device=device, dtype=dtype)
    try:
        torch.addmm(acc, operand, operand, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(acc.eq(2).all())
