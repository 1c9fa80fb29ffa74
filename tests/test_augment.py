
"""The distillation's batch augmentation: every output is the input, maybe mirrored, shifted
by at most ``pad`` pixels with zeros coming in."""

from __future__ import annotations

import pytest
import torch

from modelpress.train import flip_and_crop

pytestmark = pytest.mark.unit


def test_flip_and_crop_is_a_shifted_maybe_mirrored_copy():
    x = torch.randn(64, 3, 8, 8)
    out = flip_and_crop(x, pad=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flips, shifts = 0, set()
    for i in range(len(x)):
        found = None
        for flip in (False, True):
            src = torch.nn.functional.pad(x[i].flip(2) if flip else x[i], (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    if torch.equal(src[:, dy:dy + 8, dx:dx + 8], out[i]):
                        found = (flip, dy, dx)
        assert found is not None, i
        flips += found[0]
        shifts.add(found[1:])
    assert 16 < flips < 48 and len(shifts) > 10  # both directions, many offsets


def test_no_padding_only_mirrors():
    x = torch.randn(32, 1, 5, 5)
    out = flip_and_crop(x, pad=0, generator=torch.Generator().manual_seed(1))
    for a, b in zip(x, out):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)
