"""The chunked output-layer cross-entropy against plain fp32 cross-entropy of full logits."""

import pytest
import torch
import torch.nn.functional as F

from cpt.train.loss import IGNORE_INDEX, linear_cross_entropy

TOL = {"atol": 1e-5, "rtol": 1e-5}


def make(n, h, v, *, bias=True, dtype=torch.float32, seed=0, ignored_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::ignored_every] = IGNORE_INDEX
    return hidden, weight, b, targets


def grads_of(loss, tensors):
    grads = torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])
    return list(grads)


def reference(hidden, weight, bias, targets, scale):
    logits = hidden.float() @ weight.float().T + (0 if bias is None else bias.float())
    per_token = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return scale * per_token.sum(), per_token.detach()


@pytest.mark.parametrize(
    "n, h, v, chunk, bias",
    [(33, 16, 50, 8, True), (32, 8, 40, 8, False), (40, 12, 300, None, True), (17, 4, 10, 1, True),
     (10, 6, 20, 100, False)],
)
def test_matches_full_logits(n, h, v, chunk, bias):
    hidden, weight, b, targets = make(n, h, v, bias=bias)
    loss, per_token = linear_cross_entropy(hidden, weight, targets, 0.37, b, chunk_tokens=chunk)
    ref_loss, ref_per_token = reference(hidden, weight, b, targets, 0.37)
    assert loss.dtype == per_token.dtype == torch.float32 and loss.dim() == 0 and not per_token.requires_grad
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(per_token, ref_per_token, **TOL)
    assert (per_token[targets == IGNORE_INDEX] == 0).all()
    for got, want in zip(grads_of(loss, (hidden, weight, b)), grads_of(ref_loss, (hidden, weight, b))):
        torch.testing.assert_close(got, want, **TOL)


def test_scales_by_the_incoming_gradient():
    hidden, weight, b, targets = make(21, 8, 30)
    loss, _ = linear_cross_entropy(hidden, weight, targets, 1.0, b, chunk_tokens=5)
    ref_loss, _ = reference(hidden, weight, b, targets, 1.0)
    for got, want in zip(grads_of(2.5 * loss, (hidden, weight, b)), grads_of(2.5 * ref_loss, (hidden, weight, b))):
        torch.testing.assert_close(got, want, **TOL)


def test_backward_runs_once():
    hidden, weight, b, targets = make(8, 4, 10)
    loss, _ = linear_cross_entropy(hidden, weight, targets, 1.0, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_ignored_tokens_change_nothing():
    hidden, weight, b, targets = make(24, 8, 30, ignored_every=3)
    ignored = targets == IGNORE_INDEX
    loss, per_token = linear_cross_entropy(hidden, weight, targets, 0.5, b, chunk_tokens=7)
    grad_h, grad_w, grad_b = grads_of(loss, (hidden, weight, b))
    assert (grad_h[ignored] == 0).all()

    other = hidden.detach().clone()
    other[ignored] = torch.randn(int(ignored.sum()), 8) * 10  # different states at the ignored tokens
    other.requires_grad_()
    loss2, per_token2 = linear_cross_entropy(other, weight, targets, 0.5, b, chunk_tokens=7)
    grad_h2, grad_w2, grad_b2 = grads_of(loss2, (other, weight, b))
    torch.testing.assert_close(loss2, loss, **TOL)
    torch.testing.assert_close(per_token2, per_token, **TOL)
    torch.testing.assert_close(grad_h2, grad_h, **TOL)
    torch.testing.assert_close(grad_w2, grad_w, **TOL)
    torch.testing.assert_close(grad_b2, grad_b, **TOL)


def test_no_targets_give_zero_loss_and_gradients():
    hidden, weight, b, targets = make(9, 4, 10)
    loss, per_token = linear_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX), 1.0, b)
    assert loss.item() == 0 and (per_token == 0).all()
    assert all((g == 0).all() for g in grads_of(loss, (hidden, weight, b)))


def test_frozen_weight_and_no_grad_mode():
    hidden, weight, b, targets = make(15, 6, 20)
    weight.requires_grad_(False)
    b.requires_grad_(False)
    loss, _ = linear_cross_entropy(hidden, weight, targets, 0.2, b, chunk_tokens=4)
    loss.backward()
    assert weight.grad is None and b.grad is None
    ref_loss, _ = reference(hidden, weight, b, targets, 0.2)
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(ref_loss, hidden)[0], **TOL)

    with torch.no_grad():
        loss, per_token = linear_cross_entropy(hidden, weight, targets, 0.2, b, chunk_tokens=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref_loss.detach(), **TOL)


def test_bf16_inputs():
    hidden, weight, b, targets = make(40, 32, 64, dtype=torch.bfloat16)
    loss, per_token = linear_cross_entropy(hidden, weight, targets, 0.1, b, chunk_tokens=16)
    ref_loss, ref_per_token = reference(hidden, weight, b, targets, 0.1)
    assert loss.dtype == per_token.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-2)
    torch.testing.assert_close(per_token, ref_per_token, atol=3e-2, rtol=1e-2)
    for got, want, t in zip(grads_of(loss, (hidden, weight, b)), grads_of(ref_loss, (hidden, weight, b)),
                            (hidden, weight, b)):
        assert got.dtype == t.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def test_tied_embedding_gets_both_gradients():
    torch.manual_seed(0)
    vocab, width = 30, 8
    embedding = torch.nn.Embedding(vocab, width)
    mix = torch.nn.Linear(width, width)
    ids = torch.randint(0, vocab, (2, 12))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1).flatten()

    def hidden():
        return torch.tanh(mix(embedding(ids))).flatten(0, 1)

    loss, _ = linear_cross_entropy(hidden(), embedding.weight, targets, 1 / 22, chunk_tokens=5)
    got = torch.autograd.grad(loss, [embedding.weight, *mix.parameters()])
    ref_loss, _ = reference(hidden(), embedding.weight, None, targets, 1 / 22)
    want = torch.autograd.grad(ref_loss, [embedding.weight, *mix.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    # the tied weight's gradient has both parts: as output layer and as embedding table
    as_output = torch.autograd.grad(reference(hidden().detach(), embedding.weight, None, targets, 1 / 22)[0],
                                    embedding.weight)[0]
    assert not torch.allclose(got[0], as_output, atol=1e-6)
