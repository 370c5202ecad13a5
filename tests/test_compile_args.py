"""torch.compile's own arguments with backend="fqt": ``mode`` (Inductor's, applied to what
Inductor compiles; ``inductor_mode`` inside ``options``), ``dynamic`` and ``fullgraph``; fqt's
former ``mode`` option (now ``execution``) still works and warns."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from fqt_compiler import codegen
import fqt_compiler as fqt
from fqt_compiler.config import FQTConfig, Mode
from tests.helpers.sm90 import as_cuda_graph


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _spy_modes(monkeypatch) -> list[str]:
    seen = []
    real = codegen._inductor_mode_options

    def spy(gm, config):
        seen.append(config.inductor_mode)
        return real(gm, config)

    monkeypatch.setattr(codegen, "_inductor_mode_options", spy)
    return seen


@pytest.mark.parametrize("mode", ["max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_torch_compile_mode_reaches_inductor(mode, monkeypatch):
    seen = _spy_modes(monkeypatch)
    model = _mlp()
    loss = torch.compile(model, backend="fqt", mode=mode)(torch.randn(4, 16)).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert seen and set(seen) == {mode}  # the forward and the backward graph
    rec = fqt.last_compiles()[-1]
    assert sum(g.status is fqt.GemmStatus.LOWBIT_KERNEL for s in rec.decisions for g in s.gemms) == 5


def test_torch_compile_mode_reaches_a_configured_backend(monkeypatch):
    """torch.compile passes ``mode`` to a backend object too: it sets that object's Inductor
    mode for this compile (the object itself is unchanged); a conflicting ``inductor_mode`` and
    ``options=`` (which belong in fqt.backend(...)) are errors that say so."""
    seen = _spy_modes(monkeypatch)
    be = fqt.backend(recipe="psq8")
    torch.compile(_mlp(), backend=be, mode="max-autotune-no-cudagraphs")(torch.randn(4, 16)).sum().backward()
    assert set(seen) == {"max-autotune-no-cudagraphs"} and be.config.inductor_mode == "default"
    assert sum(g.status is fqt.GemmStatus.LOWBIT_KERNEL for r in be.records for s in r.decisions for g in s.gemms) == 5
    for kwargs, match in ((dict(mode="max-autotune"), "both given"), (dict(options={"strict": True}), "fqt.backend")):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=match):
            torch.compile(_mlp(), backend=fqt.backend(inductor_mode="reduce-overhead"), **kwargs)(torch.randn(4, 16))


def test_inductor_mode_inside_options(monkeypatch):
    seen = _spy_modes(monkeypatch)
    torch.compile(
        _mlp(), backend="fqt", options={"inductor_mode": "max-autotune-no-cudagraphs"}
    )(torch.randn(4, 16)).sum().backward()
    assert set(seen) == {"max-autotune-no-cudagraphs"}
    # an Inductor mode under the name 'mode' means the same
    assert FQTConfig.from_options({"mode": "max-autotune"}).inductor_mode == "max-autotune"


def test_former_mode_option_is_execution_and_warns():
    with pytest.warns(FutureWarning, match="now execution"):
        config = FQTConfig.from_options({"mode": "reference"})
    assert config.execution is Mode.REFERENCE and config.mode is Mode.REFERENCE
    with pytest.warns(FutureWarning):
        be = fqt.backend(mode="reference")
    out = torch.compile(_mlp(), backend=be)(torch.randn(4, 16))
    assert out.shape == (4, 8) and all(
        g.status is fqt.GemmStatus.SIMULATED for r in be.records for s in r.decisions for g in s.gemms
    )


def test_mode_errors_name_both_meanings():
    with pytest.raises(fqt.OptionsError, match=r"mode='fastest'.*execution.*max-autotune"):
        FQTConfig.from_options({"mode": "fastest"})
    with pytest.raises(fqt.OptionsError, match="inductor_mode='turbo'"):
        FQTConfig.from_options({"inductor_mode": "turbo"})
    with pytest.raises(fqt.OptionsError, match="given together"):
        FQTConfig.from_options({"mode": "max-autotune", "inductor_mode": "default"})
    with pytest.raises(fqt.OptionsError, match="both given"):
        fqt.fqt_backend(None, [], options={"inductor_mode": "default"}, mode="max-autotune")


def test_cuda_graphs_need_every_fqt_kernel_launched_by_inductor():
    """On a graph for CUDA (traced here, re-typed for CUDA): with no fqt op left as a Python
    call, CUDA graphs are kept; with one left, reduce-overhead raises and names it, and
    max-autotune keeps its autotuning and warns that it captures no CUDA graph. The CPU has
    none either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fqt_compiler.ops import quantize_kernel_op

    plain = fx.symbolic_trace(lambda x: x * 2)
    with FakeTensorMode() as m:
        for node in plain.graph.nodes:
            if node.op != "output":
                node.meta["val"] = m.from_tensor(torch.empty(2))
    reduce, autotune = ({"inductor_mode": mode} for mode in ("reduce-overhead", "max-autotune"))
    cuda = as_cuda_graph(plain)
    assert codegen._inductor_mode_options(cuda, FQTConfig.from_options(reduce)).get("triton.cudagraphs")

    graph = fx.Graph()
    x = graph.placeholder("x")
    q = graph.call_function(quantize_kernel_op, (x, fqt.QuantSpec().key(), 0))
    graph.output(graph.call_function(operator.getitem, (q, 0)))
    with_op = fx.GraphModule({}, graph)
    with FakeTensorMode() as m:
        x.meta["val"] = m.from_tensor(torch.empty(4, 4))
    cuda = as_cuda_graph(with_op)
    with pytest.raises(fqt.OptionsError, match="fqt.quantize_kernel.default"):
        codegen._inductor_mode_options(cuda, FQTConfig.from_options(reduce))
    with pytest.warns(UserWarning, match="captures no CUDA graphs"):
        opts = codegen._inductor_mode_options(cuda, FQTConfig.from_options(autotune))
    assert opts.get("max_autotune") and "triton.cudagraphs" not in opts
    assert codegen._inductor_mode_options(with_op, FQTConfig.from_options(reduce)) == {}


def test_dynamic_and_fullgraph(monkeypatch):
    model = _mlp()
    compiled = torch.compile(model, backend="fqt", dynamic=True, fullgraph=True)
    for batch in (3, 5, 9):
        out = compiled(torch.randn(batch, 16))
        out.sum().backward()
        assert out.shape == (batch, 8)


def test_a_graph_dynamo_traces_again_leaves_no_record():
    """Dynamo abandons a graph and traces the frame again (a LayerNorm on symbolic sizes asks it
    to turn a specialized float into a tensor): the abandoned attempt, which fqt never
    compiled, leaves no empty record in the backend's records or ``last_compiles()``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    be = fqt.backend(execution="reference")
    before = fqt.last_compiles()  # (last_compiles keeps the newest 64: compare by identity)
    torch.compile(model, backend=be, dynamic=True)(torch.randn(2, 8, 8)).sum().backward()
    assert [r.kind for r in be.records] == ["joint"] and be.records[0].decisions
    assert [r for r in fqt.last_compiles() if not any(r is old for old in before)] == be.records
