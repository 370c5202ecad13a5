"""Distributed training with the fqt backend over gloo with 2 CPU processes (file rendezvous, no
network): DistributedDataParallel through ``torch.compile`` and FSDP2 (``fully_shard``) through
``fqt.compile_sharded``. Gradients are synchronized, equal the single-process gradient for
deterministic recipes, agree with it *in expectation* for stochastic ones (a mean over many
seeded steps, same recipe, same data split), and each rank rounds with its own, reproducible
noise."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.grid import draw_seed

WORLD = 2
DRAWS = 24  # seeded steps averaged for the in-expectation comparison


class Net(nn.Module):
    """Two blocks (sharded on their own under FSDP2) and a head owned by the root."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU())])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _data() -> torch.Tensor:
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(1))


def _half(rank: int) -> torch.Tensor:
    return _data()[rank * 4 : (rank + 1) * 4]  # each rank its half of the batch


def _grads(model: nn.Module) -> list[torch.Tensor]:
    """Full (unsharded) gradients in parameter order; resets them."""
    out = []
    for p in model.parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out.append(g.detach().clone())
        p.grad = None
    return out


def _step(compiled, model, x, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # every rank seeded alike, as usual
    compiled(x).square().mean().backward()
    return _grads(model)


def _draws(compiled, model, x) -> list[list[torch.Tensor]]:
    return [_step(compiled, model, x, 1000 + k) for k in range(DRAWS)]


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    out: dict = {}
    for recipe in ("exact", "psq4"):
        torch._dynamo.reset()
        model = _model()
        compiled = torch.compile(
            nn.parallel.DistributedDataParallel(model), backend=fqt.backend(recipe=recipe, execution="reference")
        )
        out[f"ddp/{recipe}"] = (
            _draws(compiled, model, _half(rank)) if recipe == "psq4" else [_step(compiled, model, _half(rank), 0)]
        )
    from torch.distributed.fsdp import fully_shard

    for recipe in ("exact", "qat", "int8", "psq4"):
        torch._dynamo.reset()
        model = _model()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        be = fqt.compile_sharded(model, recipe=recipe, execution="reference")
        out[f"fsdp/{recipe}"] = _draws(model, model, _half(rank)) if recipe == "psq4" else [_step(model, model, _half(rank), 0)]
        out[f"fsdp/{recipe}/sites"] = [(g.kind.value, g.status.value) for r in be.records for s in r.decisions for g in s.gemms]
        out[f"fsdp/{recipe}/sharded"] = type(model.head.weight).__name__
    try:
        fqt.explain(model, _half(rank))
        out["explain"] = "no error"
    except fqt.FQTError as e:
        out["explain"] = str(e)
    torch.manual_seed(0)
    out["seeds"] = [int(draw_seed("cpu")) for _ in range(3)]
    torch.manual_seed(0)
    out["seeds_again"] = [int(draw_seed("cpu")) for _ in range(3)]
    torch.save(out, f"{tmp}/out{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(tmp,), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"out{r}")) for r in range(WORLD)]


def _single(recipe: str, draws: int) -> list[list[torch.Tensor]]:
    """One process, same data split: the mean of the two halves' gradients (what all-reduce of
    per-rank means computes), ``draws`` seeded steps."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend=fqt.backend(recipe=recipe, execution="reference"))
    out = []
    for k in range(draws):
        halves = [_step(compiled, model, _half(r), 1000 + k if draws > 1 else 0) for r in range(WORLD)]
        out.append([(a + b) / WORLD for a, b in zip(*halves)])
    return out


def _assert_same_expectation(dist_draws, single_draws, sigmas: float = 5.0, min_noisy: int = 3) -> None:
    """Per element: |mean_a - mean_b| within ``sigmas`` standard errors of the difference."""
    noisy = 0
    for i, (a, b) in enumerate(zip(zip(*dist_draws), zip(*single_draws))):
        a, b = torch.stack(a).double(), torch.stack(b).double()
        stderr = ((a.var(0) + b.var(0)) / len(a)).sqrt()
        gap = (a.mean(0) - b.mean(0)).abs()
        bound = sigmas * stderr + 1e-6 * b.abs().amax()
        assert (gap <= bound).all(), (
            f"parameter {i}: mean gradients differ by {float((gap - bound).max()):.3g} beyond {sigmas} sigma"
        )
        noisy += int((a.var(0) > 0).any())
    assert noisy >= min_noisy, "the weight gradients carry no rounding noise: is the recipe stochastic?"  # biases do not


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_gradients_are_synchronized_across_ranks(results, kind):
    for key in [k for k in results[0] if k.startswith(kind + "/") and isinstance(results[0][k], list) and k.count("/") == 1]:
        for draw0, draw1 in zip(results[0][key], results[1][key]):
            for a, b in zip(draw0, draw1):
                assert torch.equal(a, b), key  # all-reduced / reduce-scattered: one gradient


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_deterministic_recipes_match_one_process(results, kind):
    recipes = ("exact", "qat") if kind == "fsdp" else ("exact",)
    for recipe in recipes:
        single = _single(recipe, draws=1)[0]
        for got, want in zip(results[0][f"{kind}/{recipe}"][0], single):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_stochastic_recipe_agrees_with_one_process_in_expectation(results, kind):
    _assert_same_expectation(results[0][f"{kind}/psq4"], _single("psq4", DRAWS))


def test_fsdp2_gemms_are_compiled_and_quantized(results):
    assert results[0]["fsdp/int8/sharded"] == "DTensor"  # the parameters really are sharded
    sites = results[0]["fsdp/int8/sites"]
    # three Linears, each a forward and two backward GEMMs (the first layer has no grad_input)
    assert len([s for s in sites if s[0] == "output"]) == 3
    assert sites and all(status == "simulated" for _, status in sites), sites  # execution="reference"


def test_each_rank_rounds_with_its_own_reproducible_noise(results):
    assert results[0]["seeds"] != results[1]["seeds"]  # seeded alike, yet independent streams
    for r in results:
        assert r["seeds"] == r["seeds_again"]  # reproducible per rank
    assert results[0]["ddp/psq4"][0][0].ne(results[0]["ddp/psq4"][1][0]).any()  # fresh noise per step


def test_explain_refuses_a_sharded_model(results):
    assert "fully_shard-ed (FSDP2)" in results[0]["explain"] and "unsharded model" in results[0]["explain"]


def test_compile_sharded_refuses_an_unsharded_model():
    with pytest.raises(fqt.FQTError, match="no module of Net is fully_shard-ed"):
        fqt.compile_sharded(_model())


def test_the_expectation_check_catches_a_biased_estimator():
    g = torch.Generator().manual_seed(0)
    truth = [torch.randn(16, 8, generator=g)]
    draws = lambda bias: [[truth[0] + bias + 0.1 * torch.randn(16, 8, generator=g)] for _ in range(DRAWS)]  # noqa: E731
    _assert_same_expectation(draws(0.0), draws(0.0), min_noisy=1)
    with pytest.raises(AssertionError, match="beyond 5.0 sigma"):
        _assert_same_expectation(draws(0.3), draws(0.0), min_noisy=1)  # 10 standard errors
