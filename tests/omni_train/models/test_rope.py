import pytest
import torch

from omni_train.models.rope import apply_rope, grid_positions, rope_cos_sin, validate_rope_axes

AXES = [4, 6, 6]


def rotate(x, position):
    cos, sin = rope_cos_sin(torch.tensor([position]), AXES, 10_000.0, torch.float64)
    return apply_rope(x, cos, sin)


@pytest.mark.parametrize(
    ("axes", "head_dim", "message"),
    [([4, 6], 10, "3 entries"), ([4, 5, 7], 16, "even"), ([4, 6, 6], 32, "sums to 16")],
)
def test_invalid_axes_are_rejected_with_a_reason(axes, head_dim, message):
    with pytest.raises(ValueError, match=message):
        validate_rope_axes(axes, head_dim)


def test_valid_axes_pass():
    validate_rope_axes(AXES, 16)


def test_position_zero_is_identity_and_norms_are_kept():
    x = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, (0, 0, 0)), x)
    torch.testing.assert_close(rotate(x, (3, 1, 2)).norm(), x.norm())


def test_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64)

    def score(pq, pk):
        return (rotate(q, pq) * rotate(k, pk)).sum()

    base = score((2, 3, 1), (0, 1, 4))
    torch.testing.assert_close(score((7, 5, 6), (5, 3, 9)), base)
    assert not torch.allclose(score((2, 3, 1), (1, 1, 4)), base)  # each axis matters
    assert not torch.allclose(score((2, 3, 1), (0, 2, 4)), base)
    assert not torch.allclose(score((2, 3, 1), (0, 1, 5)), base)


def test_each_axis_rotates_only_its_channels():
    x = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    moved = rotate(x, (0, 5, 0))
    torch.testing.assert_close(moved[..., :4], x[..., :4])
    torch.testing.assert_close(moved[..., 10:], x[..., 10:])
    assert not torch.allclose(moved[..., 4:10], x[..., 4:10])


def test_grid_positions_are_frame_major_raster():
    pos = grid_positions(2, 2, 3)
    assert pos.shape == (12, 3)
    assert pos[0].tolist() == [0, 0, 0]
    assert pos[1].tolist() == [0, 0, 1]
    assert pos[3].tolist() == [0, 1, 0]
    assert pos[6].tolist() == [1, 0, 0]
    assert grid_positions(1, 1, 1, t_offset=4)[0].tolist() == [4, 0, 0]
