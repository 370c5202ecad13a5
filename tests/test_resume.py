"""Save and resume: after restoring model, optimizer and RNG state from a checkpoint, training
continues with bitwise-identical losses (stochastic rounding draws from torch's generator)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import fqt_compiler as fqt
from tests.helpers.models import CNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _steps(model, opt, compiled, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("recipe", ["bhq4", "int8"])
def test_resume_from_checkpoint_gives_bitwise_identical_losses(recipe):
    batches = _batches()
    torch.manual_seed(0)
    model = CNN(c_in=1, c=4, n_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    compiled = torch.compile(model, backend=fqt.backend(recipe=recipe, execution="reference"))
    _steps(model, opt, compiled, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    continued = _steps(model, opt, compiled, batches[3:])

    buf.seek(0)
    ckpt = torch.load(buf)
    torch._dynamo.reset()
    resumed_model = CNN(c_in=1, c=4, n_classes=10)
    resumed_model.load_state_dict(ckpt["model"])
    resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.05, momentum=0.9)
    resumed_opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    resumed = _steps(
        resumed_model, resumed_opt, torch.compile(resumed_model, backend=fqt.backend(recipe=recipe, execution="reference")),
        batches[3:],
    )
    assert all(torch.equal(a, b) for a, b in zip(continued, resumed)), (continued, resumed)
    assert not torch.equal(continued[0], continued[1])
