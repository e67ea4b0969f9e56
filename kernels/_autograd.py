"""What every loss's autograd Function shares, in torch alone (no Triton: the eager path and
the LM head's Function import it where Triton may be absent)."""

from __future__ import annotations

import torch


def detached_without_grad_mode(*tensors):
    """The operands as a loss's autograd Function should get them: detached where grad mode
    is off (``torch.no_grad``, ``inference_mode``). No graph is built there, yet the Function
    would still see an input that requires grad as needing it, and its forward would write a
    logits-sized gradient nobody can ask for (a loss logged under no_grad, say)."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(None if t is None else t.detach() for t in tensors)


def output_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Function's output ``t`` in ``dtype``: ``t.to(dtype)``, or ``t`` itself where it has
    that dtype already.

    Never ``t.to(t.dtype)`` as a forward's output: torch.compile on torch 2.11 then hands the
    backward a zero upstream gradient, and every gradient of a float32 loss is silently zero
    (eager and later torch are unaffected)."""
    return t if t.dtype == dtype else t.to(dtype)


def may_fuse_gradient() -> bool:
    """Whether a forward may write the input's gradient for its backward to scale in place.

    Not while torch.compile traces: the backward is traced once, so which call it is (the
    first scales the stored gradient, a later one recomputes) cannot be decided at run time,
    and AOTAutograd would copy the stored gradient to make its in-place update functional,
    which moves more bytes than recomputing it in the backward does."""
    return not torch.compiler.is_compiling()


def differentiable_backward(needs_input_grad, grad_out, loss_fn, *inputs):
    """The gradients of ``loss_fn(*inputs)`` (torch's ops, float32 math) with respect to the
    inputs that need them, themselves differentiable: the backward for ``create_graph=True``
    (a double backward), where the kernels' gradients would be constants and make every
    second derivative silently zero."""
    wrt = [t for t, need in zip(inputs, needs_input_grad, strict=False) if need]
    with torch.enable_grad():
        loss = loss_fn(*inputs).to(grad_out.dtype)
        grads = iter(torch.autograd.grad(loss, wrt, grad_out, create_graph=True))
    return tuple(next(grads) if need else None
                 for need in needs_input_grad[:len(inputs)])
