"""The DTensor adapters: logits sharded on the class dimension (torch's ``loss_parallel``
situation) go to the vocab-parallel loss; DTensor operands of ``linear_cross_entropy`` are
tensor parallelism (a replicated input, a weight sharded by rows: the LM head over that mesh
dimension's group) or FSDP2's sharded parameter (gathered as FSDP2 would)."""

from __future__ import annotations

import torch

from .. import _dispatch
from .._validation import (
    check_cross_entropy,
)
from .protocol import BAD_WIDTH, _shard, dtensor_widths
from .vocab_parallel import _dtypes, _sharded_loss

# ------------------------------------------------------------------------------------------
# DTensor logits sharded on the class dimension (torch's loss_parallel situation)
# ------------------------------------------------------------------------------------------


def _replicated_local(t, name: str):
    """A DTensor operand replicated over its mesh, as its local tensor (others as they are)."""
    if not _dispatch.is_dtensor(t):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"a loss with DTensor operands: the {name} must be replicated over "
                         f"the mesh, got placements {tuple(t.placements)}")
    return t.to_local()


def dtensor_cross_entropy(input, target, weight, ignore_index: int, reduction: str,
                          label_smoothing: float, softcap, z_loss: float, return_z_loss: bool,
                          temperature: float = 1.0, logit_scale: float = 1.0):
    """``cross_entropy`` of DTensor logits sharded on the class dimension (``Shard(1)``;
    ``Shard(0)`` for a :math:`(C)` input) over one mesh dimension and replicated over the
    others: the vocab-parallel loss over that mesh dimension's group, returned as a DTensor
    replicated over the mesh (as torch's ``loss_parallel``). Arguments as validated by
    ``cross_entropy``; target and weight plain tensors or replicated DTensors."""
    from torch.distributed.tensor import DTensor, Replicate

    target = _replicated_local(target, "target")
    weight = _replicated_local(weight, "weight")
    class_dim = 0 if input.dim() == 1 else 1
    mesh, placements = input.device_mesh, tuple(input.placements)
    sharded = [d for d, p in enumerate(placements) if p.is_shard()]
    if (len(sharded) != 1 or placements[sharded[0]].dim % input.dim() != class_dim
            or not all(p.is_replicate() for d, p in enumerate(placements) if d != sharded[0])):
        raise NotImplementedError(
            "cross_entropy takes DTensor logits sharded on the class dimension "
            f"(Shard({class_dim})) over one mesh dimension and replicated over the others; got "
            f"placements {placements}: call it on a local tensor or full_tensor()")
    if target.shape == input.shape and target.is_floating_point():
        raise NotImplementedError("cross_entropy with DTensor logits: probability targets "
                                  "are not supported")
    mesh_dim = sharded[0]
    group = mesh.get_group(mesh_dim)
    rank, world = mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)
    local = input.to_local()
    weight, out_dtype, input_dtype = _dtypes(local, weight)
    # torch's own checks of the global call (shapes, dtypes), on a stand-in
    check_cross_entropy(torch.empty(input.shape, dtype=input.dtype, device="meta"), target,
                        weight, ignore_index, label_smoothing, input_dtype)
    if local.dim() == 1:
        rows, t = local.unsqueeze(0), target.reshape(1)
    else:  # (N, C_r, d1, ..., dK): rows of classes
        rows = local.movedim(1, -1)
        rows, t = rows.reshape(target.numel(), rows.shape[-1]), target.reshape(-1)
    widths = dtensor_widths(input.shape[class_dim], world)

    def shard_of(signature):
        shard = _shard(widths, rank, "DTensor's placements")
        error = None
        if rows.shape[1] != shard.width:
            error = BAD_WIDTH, ValueError(
                f"cross_entropy with DTensor logits: rank {rank}'s block has "
                f"{rows.shape[1]} classes, DTensor's layout gives it {shard.width}")
        return shard, error

    loss, z = _sharded_loss(rows, t, weight, group, rank, world, shard_of, ignore_index,
                            reduction, label_smoothing, softcap, z_loss, out_dtype, input_dtype,
                            temperature, logit_scale)
    if reduction == "none":
        shape = () if input.dim() == 1 else target.shape
        loss, z = loss.view(shape), z.view(shape)
    replicated = [Replicate()] * mesh.ndim
    loss = DTensor.from_local(loss, mesh, replicated, run_check=False)
    if not return_z_loss:
        return loss
    return loss, DTensor.from_local(z, mesh, replicated, run_check=False)


# ------------------------------------------------------------------------------------------
# DTensor operands of linear_cross_entropy: tensor parallelism, or FSDP's gather
# ------------------------------------------------------------------------------------------


def _gathered_as_fsdp(t):
    """A DTensor parameter as FSDP2 unshards it for a forward: the whole tensor on every
    rank (an all-gather), whose gradient is reduce-scattered back to the shards, averaged
    over the mesh's ranks (FSDP2's default: each rank's loss is its batch's) — all-reduced
    over a dimension it is replicated on (HSDP's replicas). Plain tensors as they are."""
    if not _dispatch.is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    mesh = t.device_mesh
    return t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(
        grad_placements=[Partial("avg")] * mesh.ndim)


def dtensor_linear_head(call, fn: str, input, linear_weight, target, linear_bias,
                        kwargs: dict):
    """An LM-head loss ``fn`` (``linear_cross_entropy``, ``linear_log_probs``) with DTensor
    operands, either way a DTensor weight reaches a loss outside its module's forward:

    - **Tensor parallelism**: a DTensor ``input`` replicated over its mesh and the weight (and
      bias) sharded by class, ``Shard(0)``, over one dimension of the same mesh (replicated
      over the others): the tensor-parallel head over that dimension's group, DTensor's
      blocks; the loss a DTensor replicated over the mesh, the input's gradient the whole
      gradient, the weight's its shard's.
    - **FSDP2** (a plain ``input``, each rank its own batch): every DTensor of weight and bias
      gathered as FSDP2 does (``_gathered_as_fsdp``), the loss of this rank's batch a plain
      tensor, the weight's gradient reduce-scattered and averaged over the mesh as FSDP2's.

    ``call``: ``fn`` on plain tensors; ``kwargs``: its other arguments. The target and the
    class ``weight`` (in ``kwargs``: the cross-entropy's): plain tensors or replicated
    DTensors. What ``call`` returns, a tensor or a tuple of them (a
    named one stays named; None stays None), comes back as replicated DTensors in the
    tensor-parallel case."""
    if kwargs.get("process_group") is not None or kwargs.get("shard_sizes") is not None:
        raise ValueError(f"{fn} with DTensor operands takes their layout from their meshes: "
                         "pass no process_group or shard_sizes")
    target = _replicated_local(target, "target")
    if kwargs.get("weight") is not None:
        kwargs = dict(kwargs, weight=_replicated_local(kwargs["weight"], "weight"))
    if not _dispatch.is_dtensor(input):
        return call(input, _gathered_as_fsdp(linear_weight), target,
                    linear_bias=_gathered_as_fsdp(linear_bias), **kwargs)

    from torch.distributed.tensor import DTensor, Replicate

    mesh = input.device_mesh
    placements = tuple(getattr(linear_weight, "placements", ()))
    sharded = [d for d, p in enumerate(placements) if not p.is_replicate()]
    tensor_parallel = (
        all(p.is_replicate() for p in input.placements)
        and _dispatch.is_dtensor(linear_weight) and linear_weight.device_mesh == mesh
        and len(sharded) == 1 and placements[sharded[0]].is_shard()
        and placements[sharded[0]].dim % linear_weight.dim() == 0
        and (linear_bias is None or (_dispatch.is_dtensor(linear_bias)
                                     and linear_bias.device_mesh == mesh
                                     and tuple(linear_bias.placements) == placements)))
    if not tensor_parallel:
        raise NotImplementedError(
            f"{fn} with a DTensor input takes it replicated over its mesh and "
            "the weight (and bias) sharded by class (Shard(0)) over one dimension of the same "
            f"mesh: got input placements {tuple(input.placements)}, weight placements "
            f"{placements or type(linear_weight).__name__}; pass a plain input for FSDP's "
            "gather, or local tensors with process_group=")
    mesh_dim = sharded[0]
    widths = dtensor_widths(linear_weight.shape[0], mesh.size(mesh_dim))
    out = call(input.to_local(), linear_weight.to_local(), target,
               linear_bias=None if linear_bias is None else linear_bias.to_local(),
               **dict(kwargs, process_group=mesh.get_group(mesh_dim), shard_sizes=widths))
    replicated = [Replicate()] * mesh.ndim

    def wrap(t):
        return None if t is None else DTensor.from_local(t, mesh, replicated, run_check=False)

    if not isinstance(out, tuple):
        return wrap(out)
    wrapped = [wrap(t) for t in out]
    return type(out)(*wrapped) if hasattr(out, "_fields") else tuple(wrapped)
