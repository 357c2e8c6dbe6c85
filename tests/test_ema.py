import pytest
import torch
from torch import nn

from selfforcing.training.ema import EMA


def test_ema_follows_the_formula_with_warmup_and_start():
    model = nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.9, start=2)
    expected = model.weight.detach().clone()
    for step in range(1, 40):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, step)
        d = 0.0 if step < 2 else min(0.9, (1 + step - 2) / (10 + step - 2))
        expected = d * expected + (1 - d) * model.weight.detach()
        assert torch.allclose(ema.model.weight, expected, atol=1e-5)
    assert ema.decay_at(1000) == 0.9 and ema.decay_at(1) == 0.0
    assert not ema.model.weight.requires_grad
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)
