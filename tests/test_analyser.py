import pytest
import torch

from selfforcing.data import ShapeObject, ShapesWorld, ShapesWorldConfig
from selfforcing.data.shapes import BACKGROUND, colour_tensor, nominal_visible_fraction
from selfforcing.eval import analyse_batch, analyse_video

PERFECT = {
    "found": 1.0,
    "colour_fidelity": 1.0,
    "shape_correct": 1.0,
    "extra_objects": 0.0,
    "background_clean": 1.0,
    "frame_ok": 1.0,
}


def one_object_batch(n=24, seed=0, size=32):
    return ShapesWorld(ShapesWorldConfig(height=size, width=size, max_objects=1)).sample(n, seed=seed)


def test_real_single_object_videos_score_perfectly():
    for size in (24, 32):
        b = one_object_batch(size=size)
        summary, scores = analyse_batch(b.video, b.prompts)
        for k, v in PERFECT.items():
            assert abs(summary[k] - v) < 1e-5, (size, k, summary[k])
        assert abs(summary["size_ratio"] - 1) < 0.1
        # centroids follow the true centres (x only: a triangle's centroid sits below its box centre)
        for s, c in zip(scores, b.centres, strict=True):
            assert torch.allclose(s.centroid[:, 0, 0], c[0, :, 0], atol=0.75)


def test_multi_object_found_equals_ground_truth_visibility():
    """With several objects one may hide another; 'found' must then agree with what is truly visible."""
    b = ShapesWorld(ShapesWorldConfig(min_objects=3, max_objects=3)).sample(32, seed=2)
    _, scores = analyse_batch(b.video, b.prompts)
    judged = 0.0
    for i, s in enumerate(scores):
        visible = nominal_visible_fraction(b, i)  # [F, K]
        truth = (visible >= 0.25).float().mean(1)
        assert torch.equal(s.found, truth)
        ok = ~torch.isnan(s.shape_correct)
        assert (s.shape_correct[ok] == 1).all()
        judged += ok.float().mean() / len(scores)
        assert (s.background_clean == 1).all() and (s.extra_objects == 0).all()
    assert judged > 0.2  # shapes are judged on the frames where no object touches another


def test_noise_lowers_colour_fidelity_and_background_cleanliness():
    b = one_object_batch()
    noisy, _ = analyse_batch(b.video + 0.3 * torch.randn_like(b.video), b.prompts)
    assert noisy["colour_fidelity"] < 0.6 and noisy["background_clean"] < 0.9 and noisy["frame_ok"] < 0.5


def test_wrong_colour_is_missing_and_extra():
    b = one_object_batch()
    video = b.video.clone()
    for i, (o,) in enumerate(b.objects):
        other = "green" if o.colour != "green" else "red"
        m = b.visible[i] == 0
        video[i].permute(0, 2, 3, 1)[m] = colour_tensor(other)
    s, _ = analyse_batch(video, b.prompts)
    assert s["found"] == 0 and s["extra_objects"] == 1 and s["frame_ok"] == 0


def test_vanished_object_is_not_found_from_that_frame_on():
    b = ShapesWorld(ShapesWorldConfig(min_objects=2, max_objects=2, sizes=["small"])).sample(1, seed=5)
    video = b.video[0].clone()
    bg = torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1
    gone = b.visible[0] == 1
    gone[:6] = False  # the second object disappears at frame 6
    video.permute(0, 2, 3, 1)[gone] = bg
    s = analyse_video(video, b.prompts[0])
    assert (s.found[6:] == 0.5).all() and (s.frame_ok[6:] == 0).all()
    assert torch.isnan(s.centroid[6:, 1]).all()


def test_wrong_shape_is_caught():
    b = one_object_batch(n=12, seed=4)
    shapes = {"circle": "square", "square": "triangle", "triangle": "circle"}
    wrong = [f"a {o.size} {o.colour} {shapes[o.shape]} moving {o.direction}" for (o,) in b.objects]
    s, _ = analyse_batch(b.video, wrong)
    assert s["shape_correct"] == 0 and s["found"] == 1


def test_fragmented_object_loses_coherence_but_keeps_its_size():
    """Stray pixels of an object's colour lower coherence without moving its size or centroid."""
    b = one_object_batch(n=8, seed=6)
    video = b.video.clone()
    for i, (o,) in enumerate(b.objects):
        video[i, :, :, 0, 0] = colour_tensor(o.colour)[None, :]  # a stray pixel in the corner
        video[i, :, :, -1, -1] = colour_tensor(o.colour)[None, :]
    clean, clean_scores = analyse_batch(b.video, b.prompts)
    dirty, dirty_scores = analyse_batch(video, b.prompts)
    assert clean["coherence"] == 1.0 and dirty["coherence"] < 1.0
    assert dirty["size_ratio"] == pytest.approx(clean["size_ratio"], abs=0.02)
    same = [torch.isclose(a.centroid, c.centroid).all(-1) for a, c in zip(clean_scores, dirty_scores, strict=True)]
    assert torch.cat(same).float().mean() > 0.9  # unless the object touches a stray pixel


def test_largest_component():
    from selfforcing.eval.analyser import largest_component

    m = torch.zeros(2, 6, 6, dtype=torch.bool)
    m[0, 0:2, 0:2] = True  # 4 pixels
    m[0, 3:6, 3:6] = True  # 9 pixels
    m[0, 2, 2] = True  # diagonal neighbour only: not 4-connected
    m[1, 1, 1:5] = True
    out = largest_component(m)
    assert out[0].sum() == 9 and out[0, 4, 4] and not out[0, 0, 0]
    assert torch.equal(out[1], m[1])


def test_blank_video_finds_nothing():
    video = torch.full((4, 3, 32, 32), -1.0)
    s = analyse_video(video, [ShapeObject("red", "circle", "large", "left")])
    assert s.summary()["found"] == 0
