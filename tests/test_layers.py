import pytest
import torch

from chx.models.layers import sincos_2d


def test_sincos_2d_shape_and_dtype():
    pe = sincos_2d(3, 5, 16)
    assert pe.shape == (15, 16)
    assert pe.dtype == torch.float32


def test_sincos_2d_varies_along_rows_and_columns():
    h, w, d = 4, 6, 32
    grid = sincos_2d(h, w, d).reshape(h, w, d)  # row-major: token i*w+j is (row i, column j)
    # same column, different rows differ; same row, different columns differ
    assert not torch.allclose(grid[0, 2], grid[3, 2])
    assert not torch.allclose(grid[1, 0], grid[1, 5])
    # the first half encodes the row: constant along a row, varies down a column
    row_half, col_half = grid[..., : d // 2], grid[..., d // 2:]
    assert torch.equal(row_half, row_half[:, :1].expand_as(row_half))
    assert torch.equal(col_half, col_half[:1].expand_as(col_half))
    assert not torch.allclose(row_half[0], row_half[1])
    assert not torch.allclose(col_half[:, 0], col_half[:, 1])


def test_sincos_2d_matches_flatten_token_order():
    h, w, d = 2, 3, 8
    pe = sincos_2d(h, w, d)
    as_map = pe.T.reshape(1, d, h, w)                   # put it back on a [B, C, H, W] grid
    assert torch.equal(as_map.flatten(2).transpose(1, 2)[0], pe)
    assert torch.equal(sincos_2d(h, 1, d)[1, : d // 2], pe[w, : d // 2])  # token (1, 0) = row 1


@pytest.mark.parametrize("dim", [6, 10, 0])
def test_sincos_2d_rejects_dim_not_divisible_by_4(dim):
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, dim)
