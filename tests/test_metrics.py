"""Video-level metrics on known inputs: real videos at the ceiling, planted faults move the right figure."""

import math

import pytest
import torch

from selfforcing.data.shapes import BACKGROUND, ShapesWorld, ShapesWorldConfig
from selfforcing.eval.analyser import analyse_batch
from selfforcing.eval.metrics import drift_curve, quarters, video_motion

H = W = 24
FRAMES = 24


@pytest.fixture(scope="module")
def real():
    return ShapesWorld(ShapesWorldConfig(height=H, width=W, frames=FRAMES, max_objects=2)).sample(24, seed=3)


def motion(videos, prompts):
    _, per = analyse_batch(videos, prompts)
    rows = [video_motion(s, p, H, W) for s, p in zip(per, prompts, strict=True)]
    mean = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        mean[key] = sum(vals) / len(vals)
    return per, mean


def test_real_videos_sit_at_the_ceiling(real):
    per, m = motion(real.video, real.prompts)
    assert m["direction_ok"] == 1.0
    assert m["motion_error"] < 0.4  # centroids of pixel masks: sub-pixel quantisation only
    q = quarters(drift_curve(per, "frame_ok"))
    assert q["first_quarter"] > 0.95 and abs(q["change"]) < 0.05


def test_jitter_raises_the_motion_error(real):
    g = torch.Generator().manual_seed(0)
    shifts = torch.randint(-1, 2, (len(real.prompts), FRAMES, 2), generator=g).tolist()
    jittered = torch.stack(
        [
            torch.stack([torch.roll(f, tuple(s), (1, 2)) for f, s in zip(v, sv, strict=True)])
            for v, sv in zip(real.video, shifts, strict=True)
        ]
    )
    _, clean = motion(real.video, real.prompts)
    _, m = motion(jittered, real.prompts)
    assert m["motion_error"] > 3 * clean["motion_error"]


def test_reversed_motion_fails_direction_adherence(real):
    _, m = motion(real.video.flip(-1, -2), real.prompts)  # rotated 180 degrees: every direction reversed
    assert m["direction_ok"] == 0.0


def test_planted_drift_shows_in_the_drift_curve(real):
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 0.6, FRAMES).view(1, FRAMES, 1, 1, 1)  # noise growing along the video
    drifting = (real.video + ramp * torch.randn(real.video.shape, generator=g)).clamp(-1, 1)
    per = analyse_batch(drifting, real.prompts)[1]
    for figure in ("frame_ok", "colour_fidelity"):
        q = quarters(drift_curve(per, figure))
        assert q["change"] < -0.2 and q["late_change"] < -0.1, (figure, q)


def test_late_change_tells_settling_from_accumulating_drift():
    settling = torch.tensor([0.9] * 4 + [0.6] * 12)  # loses quality in its first frames, then holds
    accumulating = torch.linspace(0.9, 0.3, 16)  # keeps losing it
    s, a = quarters(settling), quarters(accumulating)
    assert s["change"] < -0.25 and abs(s["late_change"]) < 1e-6
    assert a["change"] < -0.4 and a["late_change"] < -0.25
    assert a["second_quarter"] == pytest.approx(float(accumulating[4:8].mean()))


def test_vanishing_object_and_colour_shift_move_their_own_figures(real):
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    vanished = real.video.clone()
    vanished[:, FRAMES // 2 :] = bg  # everything gone in the second half
    found = quarters(drift_curve(analyse_batch(vanished, real.prompts)[1], "found"))
    assert found["first_quarter"] > 0.95 and found["last_quarter"] == 0.0

    objects = (real.video - bg).abs().sum(2, keepdim=True) > 1e-3
    shifted = torch.where(objects, (real.video + 0.25).clamp(-1, 1), real.video)
    before, after = analyse_batch(real.video, real.prompts)[0], analyse_batch(shifted, real.prompts)[0]
    assert before["colour_fidelity"] > 0.99 and after["colour_fidelity"] < before["colour_fidelity"] - 0.2
    assert abs(after["background_clean"] - before["background_clean"]) < 0.01


def test_flicker_counts_frame_to_frame_change(real):
    """Real videos change only where objects move; per-frame noise (a flickering model) and a frozen
    video move the figure the right way; the units are [0, 1] pixels."""
    from selfforcing.eval.metrics import flicker

    base = flicker(real.video)
    assert 0 < base < 0.05
    g = torch.Generator().manual_seed(0)
    noisy = (real.video + 0.2 * torch.randn(real.video.shape, generator=g)).clamp(-1, 1)
    assert flicker(noisy) > 3 * base
    assert flicker(real.video[:, :1].expand(-1, 4, -1, -1, -1)) == 0.0
    assert flicker(torch.stack([-torch.ones(3, 2, 2), torch.ones(3, 2, 2)])[None]) == 1.0
    with pytest.raises(ValueError, match="at least 2 frames"):
        flicker(real.video[:, :1])
