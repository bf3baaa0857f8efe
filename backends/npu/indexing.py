"""Gather, scatter and dynamic slices in torch, in XLA's general form.

Both build one index tensor per operand dimension, broadcast over (index batch dims,
window dims), and read or write with advanced indexing: general (any dimension numbers,
batching dims included) rather than a pattern match per call site. Index vectors are
the last dim of the indices (JAX always puts them there). Modes: CLIP and
PROMISE_IN_BOUNDS clamp each start so its window fits; FILL_OR_DROP fills (gather) or
drops (scatter) a whole window whose start does not fit.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.npu.primitives import RULES, rule


def _fill_mode(mode: Any) -> bool:
    return "FILL_OR_DROP" in str(mode)


def _starts(indices: torch.Tensor, index_map: tuple[int, ...], dims: list[int],
            window: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Start per mapped operand dim [B...] (clamped so the window fits) and the in-bounds
    mask [B...] (False where a start had to move)."""
    starts, ok = {}, torch.ones(indices.shape[:-1], dtype=torch.bool, device=indices.device)
    for j, d in enumerate(index_map):
        s = indices[..., j].to(torch.int64)
        hi = dims[d] - window[d]
        ok = ok & (s >= 0) & (s <= hi)
        starts[d] = s.clamp(0, max(hi, 0))
    return starts, ok


@rule("gather")
def _gather(params, ins, outs):
    dn, slice_sizes = params["dimension_numbers"], tuple(params["slice_sizes"])
    fill = _fill_mode(params["mode"])
    op_shape = list(ins[0].shape)
    rank = len(op_shape)
    offset_dims, collapsed = tuple(dn.offset_dims), set(dn.collapsed_slice_dims)
    obatch, ibatch = tuple(dn.operand_batching_dims), tuple(dn.start_indices_batching_dims)
    index_map = tuple(dn.start_index_map)
    out_aval = outs[0]
    fill_value = params.get("fill_value")

    def run(operand, indices):
        bshape = indices.shape[:-1]
        nb = len(bshape)
        starts, ok = _starts(indices, index_map, op_shape, list(slice_sizes))
        idx = []
        for d in range(rank):  # index of operand dim d, shaped [B..., window dims...]
            w = torch.arange(slice_sizes[d], device=operand.device).reshape(
                [1] * nb + [slice_sizes[d] if e == d else 1 for e in range(rank)])
            if d in starts:
                base = starts[d].reshape(*bshape, *[1] * rank)
            elif d in obatch:
                ib = ibatch[obatch.index(d)]
                ib = ib if ib < nb else ib - 1  # index dims before the index vector dim
                base = torch.arange(bshape[ib], device=operand.device).reshape(
                    [bshape[ib] if e == ib else 1 for e in range(nb)] + [1] * rank)
            else:
                base = torch.zeros((), dtype=torch.int64, device=operand.device)
            idx.append(base + w)
        g = operand[tuple(idx)]  # [B..., slice_sizes...]
        keep = [d for d in range(rank) if d not in collapsed and d not in obatch]
        g = g.reshape(*bshape, *[slice_sizes[d] for d in keep])
        if fill:
            fv = fill_value if fill_value is not None else (
                float("nan") if operand.dtype.is_floating_point else 0)
            if operand.dtype == torch.bool:
                fv = bool(fv)
            g = torch.where(ok.reshape(*bshape, *[1] * len(keep)), g,
                            torch.tensor(fv, dtype=g.dtype, device=g.device))
        # output: batch dims fill the positions that are not offset_dims, in order
        out_rank = nb + len(keep)
        batch_pos = [p for p in range(out_rank) if p not in offset_dims]
        perm = [0] * out_rank
        for i, p in enumerate(batch_pos):
            perm[p] = i
        for i, p in enumerate(offset_dims):
            perm[p] = nb + i
        return g.permute(perm).reshape(tuple(out_aval.shape))
    return run


_COMBINE = {"scatter": None, "scatter-add": "sum", "scatter-mul": "prod", "scatter-min": "amin",
            "scatter-max": "amax"}


def _scatter_rule(name: str):
    reduce = _COMBINE[name]

    def make(params, ins, outs):
        dn = params["dimension_numbers"]
        drop = _fill_mode(params["mode"])
        op_shape = list(ins[0].shape)
        upd_shape = list(ins[2].shape)
        rank = len(op_shape)
        uwin = tuple(dn.update_window_dims)
        inserted, obatch = set(dn.inserted_window_dims), tuple(dn.operand_batching_dims)
        ibatch, index_map = tuple(dn.scatter_indices_batching_dims), tuple(
            dn.scatter_dims_to_operand_dims)
        scatter_dims = [d for d in range(len(upd_shape)) if d not in uwin]
        win_operand_dims = [d for d in range(rank) if d not in inserted and d not in obatch]
        window = [1] * rank
        for ud, od in zip(uwin, win_operand_dims, strict=True):
            window[od] = upd_shape[ud]

        def run(operand, indices, updates):
            nb = indices.ndim - 1
            bshape = indices.shape[:-1]
            starts, ok = _starts(indices, index_map, op_shape, window)
            # updates laid out as [B..., window dims of win_operand_dims order]
            u = updates.permute(*scatter_dims, *uwin)
            wshape = [window[d] for d in win_operand_dims]
            u = u.reshape(*bshape, *wshape)
            idx = []
            for d in range(rank):
                if d in win_operand_dims:
                    k = win_operand_dims.index(d)
                    w = torch.arange(window[d], device=operand.device).reshape(
                        [1] * nb + [window[d] if e == k else 1 for e in range(len(wshape))])
                else:
                    w = torch.zeros((), dtype=torch.int64, device=operand.device)
                if d in starts:
                    base = starts[d].reshape(*bshape, *[1] * len(wshape))
                elif d in obatch:
                    ib = ibatch[obatch.index(d)]
                    ib = ib if ib < nb else ib - 1
                    base = torch.arange(bshape[ib], device=operand.device).reshape(
                        [bshape[ib] if e == ib else 1 for e in range(nb)] + [1] * len(wshape))
                else:
                    base = torch.zeros((), dtype=torch.int64, device=operand.device)
                idx.append((base + w).expand(*bshape, *wshape))
            flat = torch.zeros_like(idx[0])
            for d in range(rank):  # row-major linear index into the operand
                flat = flat * op_shape[d] + idx[d]
            flat, u = flat.reshape(-1), u.reshape(-1)
            if drop:
                keep = ok.reshape(*bshape, *[1] * len(wshape)).expand(*bshape, *wshape)
                keep = keep.reshape(-1)
                flat, u = flat[keep], u[keep]  # dynamic size: the reference path
            out = operand.reshape(-1).clone()
            if reduce is None:
                out[flat] = u.to(out.dtype)
            elif out.dtype == torch.bool:
                op = {"sum": torch.logical_or, "prod": torch.logical_and,
                      "amax": torch.logical_or, "amin": torch.logical_and}[reduce]
                out[flat] = op(out[flat], u)  # (distinct indices only)
            else:
                out.scatter_reduce_(0, flat, u.to(out.dtype), reduce=reduce, include_self=True)
            return out.reshape(op_shape)
        return run
    return make


for _n in _COMBINE:
    RULES[_n] = _scatter_rule(_n)


@rule("dynamic_slice")
def _dynamic_slice(params, ins, outs):
    sizes = tuple(params["slice_sizes"])
    shape = tuple(ins[0].shape)

    def run(x, *starts):
        out = x
        for d, (s, n) in enumerate(zip(starts, sizes, strict=True)):
            s = s.to(torch.int64).clamp(0, shape[d] - n)  # XLA clamps the window inside
            out = out.narrow(d, 0, shape[d]).index_select(
                d, s + torch.arange(n, device=x.device))
        return out
    return run


@rule("dynamic_update_slice")
def _dynamic_update_slice(params, ins, outs):
    shape = tuple(ins[0].shape)

    def run(x, upd, *starts):
        idx = []
        for d, s in enumerate(starts):
            n = upd.shape[d]
            s = s.to(torch.int64).clamp(0, shape[d] - n)
            idx.append((s + torch.arange(n, device=x.device)).reshape(
                [n if e == d else 1 for e in range(len(shape))]))
        out = x.clone()
        out[tuple(idx)] = upd.to(x.dtype)
        return out
    return run
