"""The learned compression phi of pool=mlp (NSA paper, section 3.3.1): one
compressed token per block of `block` consecutive keys taken every
`stride`, an MLP over the block's keys with an intra-block position
encoding. NSAttention owns one for keys and one for values."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import num_compressed


class CompressionMLP(nn.Module):
    """phi for ``pool=mlp``: one compressed token per block of ``block``
    consecutive tokens taken every ``stride`` tokens.

    x [B, T, H, D] -> [B, Tc, H, D], Tc = max(0, (T - block) // stride + 1);
    compressed token i sees x[:, i*stride : i*stride + block]. Each block gets
    a learned intra-block position encoding (``pos`` [block, D], added to the
    block's tokens), is flattened to block*D features and mapped by
    Linear(block*D -> hidden) -> GELU -> Linear(hidden -> D), added to the mean
    of the block (a residual path). The weights are shared by the H heads.
    Blocks are gathered with ``Tensor.unfold`` (a strided view), not a loop.

    Initialisation: the last Linear starts at zero, so phi starts as mean
    pooling (which gives the compressed branch meaningful keys to rank blocks
    with from step one) and learns from there. Held-out accuracies of this
    start, a randomly initialised MLP and pool=mean on the train_tiny recall
    task: benchmarks/results/train_tiny/README.md (CPU follow-up).
    """

    def __init__(self, block: int, stride: int, dim: int, hidden: Optional[int] = None, *, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.block, self.stride, self.dim = block, stride, dim
        self.hidden = dim if hidden is None else hidden
        self.pos = nn.Parameter(torch.empty(block, dim, **kw))
        self.fc1 = nn.Linear(block * dim, self.hidden, **kw)
        self.fc2 = nn.Linear(self.hidden, dim, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, mean=0.0, std=0.02)
        self.fc1.reset_parameters()
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def num_compressed(self, T: int) -> int:
        return num_compressed(T, self.block, self.stride)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                cu_compressed: Optional[torch.Tensor] = None, rows: Optional[int] = None) -> torch.Tensor:
        """x [B, T, H, D] -> [B, Tc, H, D]; packed sequences (x [1, total,
        H, D], cu_seqlens and their compressed offsets cu_compressed):
        [1, rows, H, D], each sequence pooled alone into its rows
        cu_compressed[s]..cu_compressed[s+1]-1; rows past cu_compressed[-1]
        are padding (a buffer of varlen.compressed_bound rows needs no host
        sync; the kernels ignore those rows)."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape [B, T, H, D={self.dim}], got {list(x.shape)}")
        B, T, H, D = x.shape
        if cu_seqlens is not None:
            windows = self._packed_windows(x, cu_seqlens, cu_compressed, rows)
            Tc = rows
        else:
            Tc = self.num_compressed(T)
            if Tc == 0:
                windows = x.new_zeros(B, 0, H, self.block, D)
            else:
                # [B, Tc, H, D, block] view -> [B, Tc, H, block, D]
                windows = x.unfold(1, self.block, self.stride).transpose(-1, -2)
        return self.pool(windows)

    def pool(self, windows: torch.Tensor) -> torch.Tensor:
        """phi of blocks of keys [B, n, H, block, D] -> [B, n, H, D] (the
        cached path pools the blocks a step completes, some of whose keys
        were cached before it)."""
        B, n, H, _, D = windows.shape
        windows = windows + self.pos.to(windows.dtype)
        flat = windows.reshape(B, n, H, self.block * D)
        return windows.mean(dim=3) + self.fc2(F.gelu(self.fc1(flat)))

    def _packed_windows(self, x, cu_seqlens, cu_compressed, rows: int) -> torch.Tensor:
        """[1, rows, H, block, D]: row r is compressed token r - cu_compressed[s]
        of the sequence s holding it, read from that sequence's positions
        (found on the device: no host sync)."""
        total = x.shape[1]
        r = torch.arange(rows, device=x.device)
        seq = torch.searchsorted(cu_compressed[1:].to(torch.int64), r, right=True)
        seq = seq.clamp(max=max(cu_seqlens.numel() - 2, 0))
        start = cu_seqlens.to(torch.int64)[seq] + (r - cu_compressed.to(torch.int64)[seq]) * self.stride
        positions = (start[:, None] + torch.arange(self.block, device=x.device)).clamp(0, max(total - 1, 0))
        if total == 0:
            return x.new_zeros(1, rows, x.shape[2], self.block, x.shape[3])
        return x[0, positions].permute(0, 2, 1, 3).unsqueeze(0)

    def extra_repr(self) -> str:
        return f"block={self.block}, stride={self.stride}, dim={self.dim}, hidden={self.hidden}"
