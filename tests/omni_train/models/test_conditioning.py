import pytest
import torch

from omni_train.models.conditioning import (
    AudioProjector,
    PoseGuider,
    TimestepEmbedding,
    audio_window_indices,
    latent_frames,
    pixel_frames,
    stack_neighbor_frames,
)
from omni_train.models.config import PoseGuiderConfig


def test_latent_frame_count_follows_the_causal_vae():
    assert latent_frames(1) == 1
    assert latent_frames(17) == 5
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_frames(16)


def test_audio_window_indices():
    index = audio_window_indices(latent_frames=3, window=2)  # 9 pixel frames
    assert index.tolist() == [
        [0, 0, 0, 0, 0, 0, 1, 2],  # frame 0: pixel frame 0 repeated, then its right context
        [0, 0, 1, 2, 3, 4, 5, 6],
        [3, 4, 5, 6, 7, 8, 8, 8],  # clamped at the clip's end
    ]
    assert audio_window_indices(2, 0).tolist() == [[0, 0, 0, 0], [1, 2, 3, 4]]


def test_audio_projector_shape_and_frame_locality():
    torch.manual_seed(0)
    projector = AudioProjector(feature_dim=6, hidden_size=8, window=1)
    features = torch.randn(2, 9, 6)
    tokens = projector(features)
    assert tokens.shape == (2, 3, 6, 8)
    changed = features.clone()
    changed[:, 5] += 1.0  # pixel frame 5: latent frame 2 (5..8) and frame 1's right context
    moved = (projector(changed) - tokens).abs().amax(dim=(0, 2, 3))
    assert moved[0] == 0 and moved[1] > 0 and moved[2] > 0


def test_audio_projector_rejects_misaligned_features():
    projector = AudioProjector(feature_dim=6, hidden_size=8, window=1)
    with pytest.raises(ValueError):
        projector(torch.randn(1, 8, 6))


def test_timestep_embedding_distinguishes_times():
    embed = TimestepEmbedding(16)
    out = embed(torch.tensor([0.0, 0.5, 0.5, 1.0]))
    assert out.shape == (4, 16)
    torch.testing.assert_close(out[1], out[2])
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[3])


def test_stack_neighbor_frames_uses_zeros_beyond_the_clip():
    features = torch.arange(1, 4, dtype=torch.float32).view(1, 1, 3, 1, 1)  # frames 1, 2, 3
    stacked = stack_neighbor_frames(features, 1)
    assert stacked.shape == (1, 3, 3, 1, 1)
    # channels = [previous, own, next] frame
    assert stacked[0, :, :, 0, 0].T.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 0]]


def test_pose_guider_shape():
    cfg = PoseGuiderConfig(num_keypoints=5, hidden_channels=8, out_channels=3, neighbor_frames=1)
    guider = PoseGuider(cfg)
    out = guider(torch.rand(2, 5, 9, 32, 16))
    assert out.shape == (2, 9, 3, 4, 2)
    assert guider.out_channels == 9


def test_pose_guider_is_causal_in_time():
    torch.manual_seed(0)
    cfg = PoseGuiderConfig(num_keypoints=3, hidden_channels=8, out_channels=2, neighbor_frames=0)
    guider = PoseGuider(cfg)
    heatmaps = torch.rand(1, 3, 9, 16, 16)
    base = guider(heatmaps)
    later = heatmaps.clone()
    later[:, :, 5:] = torch.rand(1, 3, 4, 16, 16)  # pixel frames of latent frame 2 only
    moved = (guider(later) - base).abs().amax(dim=(0, 1, 3, 4))
    assert moved[0] == 0 and moved[1] == 0 and moved[2] > 0
    first = heatmaps.clone()
    first[:, :, 0] = 0.0
    assert (guider(first) - base)[:, :, 0].abs().max() > 0  # frame 0 is seen by latent frame 0


@pytest.mark.parametrize("neighbors", [0, 1, 2])
def test_a_frame_range_of_pose_features_equals_that_range_of_the_whole_clips(neighbors):
    # What a sequence-parallel rank computes from its frames' heatmaps alone.
    torch.manual_seed(0)
    guider = PoseGuider(PoseGuiderConfig(num_keypoints=3, neighbor_frames=neighbors)).double()
    assert guider.history_latent_frames == 2  # pixel frames 4j - 8 .. 4j feed latent frame j
    heatmaps = torch.rand(2, 3, pixel_frames(7), 16, 16, dtype=torch.float64)
    whole = guider(heatmaps)
    for start, stop in [(0, 7), (0, 3), (3, 5), (4, 7), (6, 7), (1, 2), (2, 6)]:
        part = guider(heatmaps, (start, stop))
        # float64: only the convolutions' summation order may differ.
        torch.testing.assert_close(part, whole[:, :, start:stop], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="latent frames 5:9 are not within the clip's 7"):
        guider(heatmaps, (5, 9))


def test_a_frame_range_of_audio_tokens_equals_that_range_of_the_whole_clips():
    torch.manual_seed(0)
    projector = AudioProjector(feature_dim=5, hidden_size=8, window=2).double()
    features = torch.rand(2, pixel_frames(6), 5, dtype=torch.float64)
    whole = projector(features)
    for start, stop in [(0, 2), (2, 6), (5, 6)]:
        assert torch.equal(projector(features, (start, stop)), whole[:, start:stop])
