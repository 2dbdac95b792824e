"""The fused output head + cross-entropy: the pretraining loss without the full logits.

The output head of a small model is most of its cost: for d=256 and a 32768-entry vocabulary the
(B*T, V) fp32 logits of one 8 x 256 micro-batch are 268 MB, and cross-entropy over them (forward
and backward) is a third of a CPU step. `linear_cross_entropy` therefore fuses the head matmul with
the cross-entropy and works on row chunks of the final hidden states, so the full logits never exist:

    for each chunk of rows c:  z = h_c W^T  (c, V) -> log_softmax -> loss_c
                               dz = softmax(z) - onehot(y)  (in place, same buffer)
                               dh_c = dz W,  dW += dz^T h_c

The gradients are computed in the forward pass (the loss is a scalar, so the incoming gradient is
one number that backward multiplies in); nothing is recomputed and only one chunk of logits is
alive at a time. Liger-Kernel's fused linear cross-entropy does the same thing with Triton kernels
(Hsu et al. 2024); with `impl="auto"` it is used on CUDA when installed.

Shared rows (`share_rows=True`). An untied head that starts at zero keeps every row of an id no batch
has yet targeted identical to the others: each such row j gets the same gradient, sum_i p_ij h_i, and
an elementwise optimizer (AdamW, Adafactor, ...) keeps equal rows equal. On a narrow corpus that is most of
the vocabulary (the bundled corpus targets 14,894 of Mistral v3's 32,768 ids). Those M rows are one
vector u, so the chunk loop runs on K + 1 rows: the K others and u, whose logit gets + log M (the M
equal logits summed in the normaliser). Row u's gradient is split evenly over the M rows, which is what
the full softmax gives each of them. Exact: the loss and both gradients are the full head's, up to
float summation order, and the work scales with K + 1 instead of V. Rows targeted in this call are always
among the K (a target's row gets its own gradient, so it leaves the group at this step's update).
Without gradients (evaluation) targets may fall inside the group: they score u's logit without the log M.

Unseen smoothing (`unseen_smoothing=eps`, with shared rows). A model trained only on its corpus learns that the
ids the corpus never uses never occur, and pays for it on any other text: a 300 s `demo` model gives the group
0.6% of its mass on average (median 0.2%), so each such id costs ~22 bits, and they are 1.9% of the tokens of
literary English outside the bundled corpus (5% of its bits) and 10% of modern English (21% of its bits;
bench/RESULTS.md, "Fourteenth sitting"). With eps > 0 each target keeps 1 - eps of its mass and the group gets
eps, spread evenly over its M rows: label smoothing onto the ids no batch has targeted, d(loss)/dz = softmax -
(1 - eps) onehot(y) - eps/M on each group row. Every group row still gets the same gradient (u's, over M), so the
rows stay equal and the sharing stays exact. The returned value is the plain
cross-entropy, comparable with an eval's; the gradient is the smoothed objective's. With no group (no two equal
rows left) there is nothing to smooth onto and the gradient is plain cross-entropy's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.config import LossImpl
from kiln.errors import ConfigError

IGNORE = -100  # target id that no loss counts (F.cross_entropy's default ignore_index); data marks padding with it

def default_chunk_rows(device: torch.device) -> int:
    """Rows per chunk. A chunk's logits are rows x V (x 4 bytes in fp32: 256 x 32768 -> 32 MB).

    On CPU small chunks stay closer to the caches (256 rows measured fastest of 64-2048 for
    d=256, V=32768 on 1 thread); on a GPU each chunk must be big enough to fill the device (4096
    rows: 0.5 GB of fp32 softmax at V=32768, small next to the activations).
    """
    return 4096 if device.type == "cuda" else 256


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the head matmul in here (the input dtype without autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) over rows with y_i != -100; the gradients are made in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, w_full: Tensor, targets: Tensor, chunk_rows: int, cdt: torch.dtype,
                share_rows: bool, unseen_smoothing: float) -> Tensor:
        # h: (N, d), w_full: (V, d), targets: (N,) int64 -> scalar fp32
        group = shared_rows(w_full, targets) if share_rows else None
        w, last_bias, eps = w_full, None, 0.0
        if group is not None:  # the K rows of their own, then u; targets re-indexed into those K
            w, targets = _compact(w_full, targets, group)
            last_bias, eps = math.log(group.size), unseen_smoothing
        N, V = h.shape[0], w.shape[0]
        rows = max(1, min(chunk_rows, N))  # N = 0 (every target ignored): no chunk runs, the loss is 0
        wc = w.to(cdt)  # one cast of the head for all chunks (a no-op in fp32)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        # summed over chunks in fp32; the first chunk writes it (zeros only when there are no rows)
        grad_w = (torch.empty if N else torch.zeros)(w.shape, dtype=torch.float32, device=w.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # (rows, V) buffers reused by every chunk: on CPU a fresh 32 MB tensor per chunk costs more in page
        # faults than the softmax itself (CUDA's caching allocator reuses memory anyway)
        z_buf = torch.empty(rows, V, dtype=cdt, device=h.device)
        low = cdt != torch.float32
        # low precision: the logits are copied to fp32 for the softmax, whose fp32 kernel is ~3x faster on
        # CPU than softmax(bf16, dtype=fp32), and the gradient goes back into z_buf; on CUDA in place
        # (the shared row's log M is added in fp32 too: bf16 would round it by up to 0.03)
        p_buf = torch.empty(rows, V, dtype=torch.float32, device=h.device) \
            if not (low and h.is_cuda) or last_bias is not None else None
        gw_buf = torch.empty(w.shape, dtype=cdt, device=w.device) if low and N > rows else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, N, rows):
                stop = min(start + rows, N)
                n = stop - start
                hc = h[start:stop].to(cdt)  # (n, d)
                y = targets[start:stop]
                valid = y != IGNORE
                y_safe = y.clamp_min(0)[:, None]  # (n, 1); ignored rows point at id 0 and are zeroed below
                z = torch.mm(hc, wc.t(), out=z_buf[:n])  # (n, V) logits
                if low and p_buf is not None:
                    z = p_buf[:n].copy_(z)
                if last_bias is not None:
                    z[:, -1] += last_bias  # u's logit stands for M equal logits
                z_y = z.gather(1, y_safe).squeeze(1).float()  # (n,)
                z_max = z.amax(dim=-1).float()  # (n,)
                if z.dtype == torch.float32:  # in place when z is p_buf's copy
                    p = torch.ops.aten._softmax.out(z, -1, False, out=p_buf[:n])  # (n, V)
                else:
                    p = torch.softmax(z, dim=-1, dtype=torch.float32)
                # logsumexp without a second exp pass: the largest probability is exp(0) / sum = 1 / sum,
                # and it is at least 1/V, so its log never underflows.
                lse = z_max - torch.log(p.amax(dim=-1))
                total += torch.where(valid, lse - z_y, 0.0).sum()
                # d(sum CE)/dz = softmax - onehot, made in p's buffer; ignored rows get zero. Smoothed: the target
                # 1 - eps, u (the group's M rows) eps
                p.scatter_add_(1, y_safe, torch.where(valid, eps - 1.0, 0.0)[:, None])
                if eps:
                    p[:, -1] -= eps
                if h.is_cuda or not bool(valid.all()):  # no host sync on CUDA: always mask there
                    p.mul_(valid[:, None])
                dz = z_buf[:n].copy_(p) if low else p  # the logits in z_buf are no longer needed
                if dz.dtype == grad_h.dtype:
                    torch.mm(dz, wc, out=grad_h[start:stop])  # (n, d)
                else:
                    grad_h[start:stop] = dz @ wc
                if cdt == torch.float32 and start == 0:  # (V, d)
                    torch.mm(dz.t(), hc, out=grad_w)
                elif cdt == torch.float32:
                    grad_w.addmm_(dz.t(), hc)
                elif start == 0:
                    grad_w.copy_(dz.t() @ hc)
                else:
                    grad_w += torch.mm(dz.t(), hc, out=gw_buf)
        if group is not None:  # back to (V, d): own rows their gradients, each shared row 1/M of u's
            grad_w = _spread(grad_w, group, w_full.shape[0])
        ctx.save_for_backward(grad_h, grad_w.to(w_full.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # scaled in place: no second (V, d) buffer; a second backward through this graph would need the
        # unscaled values and fails autograd's version check instead of silently using these
        return (grad_h.mul_(grad_out.to(grad_h.dtype)), grad_w.mul_(grad_out.to(grad_w.dtype)),
                None, None, None, None, None)


@dataclass(frozen=True)
class SharedRows:
    """A group of M >= 2 bitwise-equal head rows no target of this call points at."""

    own: Tensor  # (K,) ids of the other rows, ascending
    rep: int  # one id of the group: its row is u
    size: int  # M
    column: Tensor  # (V,) id -> its column among the K + 1 (K for the group's ids)


def shared_rows(w: Tensor, targets: Tensor | None = None) -> SharedRows | None:
    """The largest group of equal rows of `w` (V, d), outside `targets`' ids when given, or None when no
    two such rows are equal. Rows are bucketed by their fp32 dot product with a fixed vector; only the fullest bucket's
    rows are compared bitwise (about V * d compares: a few ms at V=32768, d=128 on a CPU)."""
    V = w.shape[0]
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):  # bf16 keys would bucket unequal rows together
        probe = torch.linspace(1.0, 2.0, w.shape[1], device=w.device, dtype=torch.float32)
        keys = w.float() @ probe  # (V,)
        values, counts = torch.unique(keys, return_counts=True)
        best = int(counts.argmax())
        if int(counts[best]) < 2:
            return None
        left, same = keys == values[best], None
        while True:  # unequal rows can share a key: take the bucket's largest set of equal rows
            idx = left.nonzero().squeeze(1)
            equal = left.clone()
            equal[idx] = (w.index_select(0, idx) == w[idx[0]]).all(dim=1)
            if same is None or equal.sum() > same.sum():
                same = equal
            left &= ~equal
            if int(left.sum()) <= int(same.sum()):
                break
        if targets is not None:
            same[targets[targets != IGNORE]] = False
        members = same.nonzero().squeeze(1)
        if members.numel() < 2:
            return None
        own = (~same).nonzero().squeeze(1)
        column = torch.full((V,), own.numel(), dtype=torch.long, device=w.device)
        column[own] = torch.arange(own.numel(), device=w.device)
        return SharedRows(own=own, rep=int(members[0]), size=members.numel(), column=column)


def _spread(grad: Tensor, group: SharedRows, V: int) -> Tensor:
    """(K + 1, d) gradient -> (V, d): the K rows in place, u's gradient / M on every row of the group (one
    gather over V rows by each id's column)."""
    grad[-1] /= group.size
    return grad.index_select(0, group.column)


def _compact(w: Tensor, targets: Tensor, group: SharedRows) -> tuple[Tensor, Tensor]:
    """The (K + 1, d) head of `group` (its own rows, then u) and the targets as its columns (-100 kept)."""
    rows = torch.cat([group.own, group.own.new_tensor([group.rep])])
    return w.index_select(0, rows), torch.where(targets == IGNORE, IGNORE, group.column[targets.clamp_min(0)])


def _chunked_loss_no_grad(h: Tensor, w: Tensor, targets: Tensor, chunk_rows: int, cdt: torch.dtype,
                          share_rows: bool = False) -> Tensor:
    """The same sum without gradients (evaluation): one chunk of logits at a time. With a group of shared
    rows, a target inside it scores u's logit without the + log M that stands for the group's other rows:
    its cross-entropy against column K, plus log M."""
    group = shared_rows(w) if share_rows else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    if group is not None:
        w, targets = _compact(w, targets, group)
        total += math.log(group.size) * (targets == group.own.numel()).sum()
    wc = w.to(cdt)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.shape[0], chunk_rows):
            logits = (h[start:start + chunk_rows].to(cdt) @ wc.t()).float()
            if group is not None:
                logits[:, -1] += math.log(group.size)
            total += F.cross_entropy(logits, targets[start:start + chunk_rows], ignore_index=IGNORE, reduction="sum")
    return total


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, *, impl: LossImpl = "auto",
                         chunk_rows: int | None = None, share_rows: bool = False,
                         unseen_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy of logits h @ w.T against `targets` (-100 ignored), fp32 scalar.

    h: (N, d) final hidden states; w: (V, d) output head; targets: (N,). `impl`:
      plain    full logits, F.cross_entropy (the reference)
      chunked  row chunks, fused gradients (never holds more than chunk_rows x V logits)
      liger    Liger-Kernel's fused linear cross-entropy (CUDA, `pip install liger-kernel`)
      auto     liger on CUDA when installed, else chunked
    `share_rows`: chunked: compute a group of equal head rows once (module docstring).
    `unseen_smoothing`: chunked with `share_rows`: the gradient gives that much of each target's mass to the group
    (module docstring); auto then means chunked, and plain or liger is a ConfigError.
    """
    if unseen_smoothing:
        if not share_rows or impl not in ("auto", "chunked"):
            raise ConfigError("train.unseen_smoothing needs the chunked loss (train.loss_impl auto or chunked) and an "
                              "untied head that starts at zero (model.init_zero_out true, model.tie_embeddings false)")
        impl = "chunked"
    if impl == "auto":
        impl = "liger" if h.is_cuda and _liger_loss() is not None else "chunked"
    if impl == "plain":
        logits = F.linear(h, w)  # (N, V)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    cdt = _compute_dtype(h.device, h.dtype)
    if impl == "liger":
        loss_cls = _liger_loss()
        if loss_cls is None:
            raise ConfigError("loss impl 'liger' needs liger-kernel (pip install -e '.[speed]', or pip install liger-kernel); "
                              "use train.loss_impl=chunked")
        return loss_cls(ignore_index=IGNORE, reduction="sum")(w.to(cdt), h.to(cdt), targets).float()
    chunk_rows = chunk_rows or default_chunk_rows(h.device)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(h, w, targets, chunk_rows, cdt, share_rows, unseen_smoothing)
    return _chunked_loss_no_grad(h, w, targets, chunk_rows, cdt, share_rows)


_LIGER: list = []


def check_loss_impl(impl: str, device: torch.device) -> None:
    """train.loss_impl=liger where Liger's kernel does not load is refused (the loss would say it at its first step)."""
    if impl == "liger" and (device.type != "cuda" or _liger_loss() is None):
        raise ConfigError("train.loss_impl=liger needs liger-kernel and a CUDA device (pip install -e '.[speed]', "
                          "or pip install liger-kernel); use train.loss_impl=chunked")


def _liger_loss():
    """Liger's LigerFusedLinearCrossEntropyLoss class, or None when the package is missing."""
    if not _LIGER:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception:  # not installed, or no Triton / CUDA build
            LigerFusedLinearCrossEntropyLoss = None
        _LIGER.append(LigerFusedLinearCrossEntropyLoss)
    return _LIGER[0]
