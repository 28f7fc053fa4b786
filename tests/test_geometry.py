"""Sequence geometry against enumeration from NSA_MATH.md's definitions:
compressed token i pools positions i*d .. i*d + l - 1 and position t sees it
once that last position is <= t; selection block j holds positions
j*l' .. (j+1)*l' - 1."""
from __future__ import annotations

import pytest
import torch

from nsa_dsl.geometry import compressed_end, compressed_length, num_blocks, num_compressed, visible_compressed
from nsa_dsl.ir import Compress, Dims, Heads, Pattern, Window

SHAPES = [(1, 1), (4, 1), (4, 2), (8, 4), (16, 16), (32, 16), (32, 8), (5, 5)]


def tokens_within(T, block, stride):
    """Compressed tokens whose every position is < T."""
    return [i for i in range(T + 1) if i * stride + block - 1 <= T - 1]


@pytest.mark.parametrize("block,stride", SHAPES)
def test_num_compressed_counts_the_whole_tokens(block, stride):
    for T in range(0, 100):
        assert num_compressed(T, block, stride) == len(tokens_within(T, block, stride)), T


@pytest.mark.parametrize("block,stride", SHAPES)
def test_visible_compressed_counts_the_tokens_a_position_sees(block, stride):
    for t in range(0, 100):
        seen = [i for i in range(t + 2) if compressed_end(i, block, stride) <= t]
        assert visible_compressed(t, block, stride) == len(seen), t
        assert seen == list(range(len(seen))), "a position sees a prefix of the tokens"


def test_compressed_end_of_a_tensor_is_elementwise():
    ids = torch.arange(7)
    assert compressed_end(ids, 8, 4).tolist() == [compressed_end(i, 8, 4) for i in range(7)]


def test_known_values():
    assert [num_compressed(T, 32, 16) for T in (0, 31, 32, 47, 48)] == [0, 0, 1, 1, 2]
    assert num_compressed(5, 1, 1) == 5
    assert [num_blocks(T, 64) for T in (0, 1, 64, 65)] == [0, 1, 1, 2]


@pytest.mark.parametrize("select_block", [1, 3, 16, 64])
def test_num_blocks_counts_the_blocks_with_a_position(select_block):
    for T in range(0, 200):
        assert num_blocks(T, select_block) == len({t // select_block for t in range(T)}), T


def test_compressed_length_of_a_pattern():
    heads, dims = Heads(q=4, kv=2), Dims(qk=16, v=16)
    window_only = Pattern(name="w", heads=heads, dims=dims, window=Window(size=8))
    assert compressed_length(window_only, 100) == 0
    compressed = Pattern(name="c", heads=heads, dims=dims, compress=Compress(block=8, stride=4))
    assert [compressed_length(compressed, T) for T in (7, 8, 11, 12, 100)] == [0, 1, 1, 2, num_compressed(100, 8, 4)]
