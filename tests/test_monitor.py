"""Live numerics monitoring (``fqt.Monitor``): records, alerts, the adaptive policy, sinks, cost.

The training runs use the demo's CNN (``DigitsNet``: conv-BN-ReLU, a residual block, a Linear
head) on a synthetic 10-class problem with fixed seeds, in reference execution (eager: seconds
to compile). Two kinds of deliberately bad site are tested separately: a rule giving one layer
2-bit gradients, and a forward quantizer with a tiny clipping range.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.monitor_sinks import read_log
from examples.monitor_digits import sgd_steps
from fqt_compiler.tools.demo import DigitsNet
from fqt_compiler.tools.monitor_log import render

BAD = "block.conv1"
TWO_BIT = fqt.QuantSpec(bits=2, granularity="tensor", rounding="stochastic")
STEPS = 150


def _tiny_clip(x, spec, generator=None):
    return x.clamp(-0.01, 0.01)  # a forward quantizer whose range is far too small


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fqt.register_quantizer("tiny_clip", _tiny_clip, unbiased=False, replace=True)
    yield
    fqt.unregister_quantizer("tiny_clip")


def _data(n: int = 2048):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():
        y = teacher(2 * x).argmax(1)
    return x, y


def train(rules=(), policy=None, every=5, steps=STEPS, sinks=(), recipe="int8", **options):
    """(monitor, backend, per-step losses) of one fixed-seed training run."""
    x, y = _data()
    torch.manual_seed(0)
    model = DigitsNet(8)
    mon = fqt.Monitor(every=every, policy=policy, warn=False, sinks=sinks)
    be = fqt.backend(recipe=recipe, execution="reference", rules=list(rules), monitor=mon, **options)
    return mon, be, sgd_steps(model, torch.compile(model, backend=be), x, y, steps)


def last20(losses) -> float:
    return sum(losses[-20:]) / 20


@pytest.fixture(scope="module")
def healthy():
    torch._dynamo.reset()
    return train()


def _alert_sites(mon) -> set[str]:
    return {a["module"] for a in mon.alerts}


def _row(table: str, module: str) -> str:
    return next(line for line in table.splitlines() if f" {module} " in f" {line} ")


# ------------------------------------------------------------------ healthy configurations
def test_healthy_run_records_every_site_and_raises_no_alert(healthy):
    mon, be, losses = healthy
    assert mon.alerts == []
    sites = {f"{d.graph_id}.{d.site_id}": d for d in be.records[0].decisions}
    kinds = {(r["site"], r["kind"]) for r in mon.records}
    for name, d in sites.items():  # every site: its quantizers, its forward GEMM, its weight gradient
        assert {(name, "quantizer"), (name, "forward"), (name, "gradient")} <= kinds, name
    for r in mon.records:  # named as the decision table names them
        d = sites[r["site"]]
        assert r["module"] == d.module_path and r["gemm"] in {g.kind.value for g in d.gemms}
        assert r["step"] % 5 == 0 and r["stage"] in ("forward", "backward")
    fwd = [r["rel_error"] for r in mon.records if r["kind"] == "forward"]
    assert max(fwd) < 0.03  # int8 per-row: about 40 dB SQNR
    grads = [r for r in mon.records if r["kind"] == "gradient"]
    assert all(r["var_ratio"] < 0.01 and r["sampling_var"] > 0 and r["own_var"] > 0 for r in grads)
    assert len({r["step"] for r in mon.records}) == STEPS // 5


@pytest.mark.parametrize("recipe", ["ptq8", "psq8", "bhq8", "fp8"])
def test_paper_recipes_raise_no_alert(recipe):
    mon, _, losses = train(recipe=recipe, steps=60)
    assert mon.alerts == [], [a["message"] for a in mon.alerts[:3]]
    assert math.isfinite(last20(losses))


# ------------------------------------------------------------------ bad sites
def test_two_bit_gradient_site_is_singled_out(healthy, tmp_path):
    rule = fqt.Rule(name="2bit", module=BAD, specs={"grad_input.grad_output": TWO_BIT, "grad_weight.grad_output": TWO_BIT})
    log = tmp_path / "bad.jsonl"
    mon, _, _ = train([rule], sinks=[str(log)])
    assert _alert_sites(mon) == {BAD}
    assert {a["quantity"] for a in mon.alerts} == {"var_ratio"}
    assert "8 bits" in mon.alerts[0]["fix"] and BAD in mon.alerts[0]["message"]
    bad = [r["var_ratio"] for r in mon.records if r["kind"] == "gradient" and r["module"] == BAD]
    good = [r["var_ratio"] for r in healthy[0].records if r["kind"] == "gradient" and r["module"] == BAD]
    assert min(bad) > 100 * max(good)
    mon.sinks[0].flush()
    table = render(str(log))
    assert "var_ratio x" in _row(table, BAD)
    for other in ("stem", "block.conv2", "head"):
        assert _row(table, other).rstrip().endswith("-"), other


def test_two_bit_gradient_site_fixed_by_the_policy(healthy):
    rule = fqt.Rule(name="2bit", module=BAD, specs={"grad_input.grad_output": TWO_BIT, "grad_weight.grad_output": TWO_BIT})
    mon, be, losses = train([rule], policy=fqt.AdaptivePolicy())
    changes = [r for r in mon.records if r["kind"] == "policy"]
    assert len(changes) == 1 and changes[0]["module"] == BAD and changes[0]["step"] == 0
    assert "int8" in changes[0]["action"]
    # the graph recompiled with the fix: the site's gradient quantizers are 8-bit now
    site = next(d for d in be.records[0].decisions if d.module_path == BAD)
    grad = next(g for g in site.gemms if g.kind is fqt.GemmKind.GRAD_WEIGHT)
    assert grad.rule.startswith("rule monitor:") and all(o.spec.bits == 8 for o in grad.operands)
    after = [r["var_ratio"] for r in mon.records if r["kind"] == "gradient" and r["module"] == BAD and r["step"] > 0]
    assert max(after) < 0.1
    assert abs(last20(losses) - last20(healthy[2])) <= 0.05 * last20(healthy[2])


def test_clipping_forward_quantizer_is_singled_out(tmp_path):
    clip = fqt.Rule(name="clip", module=BAD, gemm="output", specs={"output.activation": fqt.QuantSpec(quantizer="tiny_clip")})
    mon, _, _ = train([clip], steps=10)
    first = [a for a in mon.alerts if a["step"] == 0]
    assert {a["module"] for a in first} == {BAD}
    assert {"clipped", "rel_error"} <= {a["quantity"] for a in first}
    clipped = next(r for r in mon.records if r["kind"] == "quantizer" and r["module"] == BAD and r["role"] == "activation")
    assert clipped["clipped"] > 0.3
    assert "min-max" in next(a for a in first if a["quantity"] == "clipped")["fix"]


def test_clipping_forward_quantizer_fixed_by_the_policy(healthy):
    clip = fqt.Rule(name="clip", module=BAD, gemm="output", specs={"output.activation": fqt.QuantSpec(quantizer="tiny_clip")})
    _, _, unfixed = train([clip], steps=40)
    assert not math.isfinite(last20(unfixed)) or last20(unfixed) > 1.5 * last20(healthy[2])
    mon, be, losses = train([clip], policy=fqt.AdaptivePolicy())
    assert {r["module"] for r in mon.records if r["kind"] == "policy"} == {BAD}
    assert {a["step"] for a in mon.alerts} == {0}  # none after the fix
    assert abs(last20(losses) - last20(healthy[2])) <= 0.05 * last20(healthy[2])


# ------------------------------------------------------------------ statistics
def test_online_quantization_variance_agrees_with_stats():
    """Theorem 2's quantization variance of each weight gradient, measured online (the whole
    backward run twice on monitored steps) against ``fqt_compiler.stats`` (Monte Carlo over 64
    backward passes): within 3 standard errors of the online mean, per layer."""
    from fqt_compiler.stats import gradient_stats

    pytest.importorskip("sklearn")
    from fqt_compiler.tools.demo import load_digits

    xtr, ytr, _, _ = load_digits(0)
    batches = [(xtr[i * 64:(i + 1) * 64], ytr[i * 64:(i + 1) * 64]) for i in range(8)]
    torch.manual_seed(0)
    model = DigitsNet(16)

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    offline = gradient_stats(model, loss_fn, batches, "psq4", draws=64, profile=False, quantizers=False)
    torch._dynamo.reset()
    mon = fqt.Monitor(every=1, warn=False, total_variance=True)
    step = torch.compile(model, backend=fqt.backend(recipe="psq4", execution="reference", monitor=mon))
    n = 30
    for _ in range(n):  # the model does not change: every monitored step sees the same batch
        model.zero_grad()
        loss_fn(step, batches[0]).backward()
    layers = {s.layer: s for s in offline.layers}
    for module in ("stem", "block.conv1", "block.conv2", "head"):
        v = [r["total_var"] for r in mon.records if r["kind"] == "gradient" and r["module"] == module]
        assert len(v) == n
        mean = sum(v) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1) / n)
        assert abs(mean - layers[module].quantization_variance) <= 3 * se, (module, mean, se, layers[module])


def test_a_biased_gradient_quantizer_fails_the_bias_check():
    fqt.register_quantizer("round_down", lambda x, spec, generator=None: (x * 127).floor() / 127, unbiased=False, replace=True)
    try:
        spec = fqt.QuantSpec(quantizer="round_down")
        rule = fqt.Rule(name="biased", module="head", specs={"grad_weight.grad_output": spec})
        mon, _, _ = train([rule], steps=20)
    finally:
        fqt.unregister_quantizer("round_down")
    assert _alert_sites(mon) == {"head"}
    assert {a["quantity"] for a in mon.alerts} == {"bias"}
    assert "unbiased" in mon.alerts[0]["fix"]


def test_noisy_bias_needs_the_window():
    def scaled(x, spec, generator=None):  # stochastic rounding, then 20% too large: noisy and biased
        s = x.abs().amax().clamp_min(1e-30) / 127
        return 1.2 * s * torch.floor(x / s + torch.rand(x.shape, generator=generator))

    fqt.register_quantizer("scaled", scaled, unbiased=False, replace=True)
    try:
        rule = fqt.Rule(name="biased", module="head", specs={"grad_weight.grad_output": fqt.QuantSpec(quantizer="scaled")})
        mon, _, _ = train([rule], steps=60, every=2)
    finally:
        fqt.unregister_quantizer("scaled")
    biased = [a for a in mon.alerts if a["quantity"] == "bias_z"]
    assert biased and {a["module"] for a in biased} == {"head"}
    assert min(a["step"] for a in biased) >= 4  # the z-score needs three monitored steps


# ------------------------------------------------------------------ sinks and options
def test_json_lines_log_and_callback_see_the_same_records(tmp_path):
    seen = []
    log = tmp_path / "m.jsonl"
    mon, _, _ = train(steps=4, every=2, sinks=[seen.append, str(log)])
    mon.sinks[1].close()
    assert read_log(log) == json.loads(json.dumps(seen)) == json.loads(json.dumps(list(mon.records)))
    text = render(str(log))
    assert "2 monitored steps (0 .. 2)" in text and "no alerts" in text
    assert "forward" in render(str(log), site="0.0")
    out = render(str(log), plot=str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0 and "plot:" in out


def test_cli_reads_a_log(tmp_path, capsys):
    from fqt_compiler.tools.cli import main

    log = tmp_path / "m.jsonl"
    log.write_text(json.dumps({"kind": "forward", "step": 0, "graph": 0, "site": "0.0", "module": "fc", "gemm": "output",
                               "stage": "forward", "rel_error": 0.5, "sqnr_db": 6.0, "nonfinite": 0}) + "\n")
    assert main(["monitor", str(log)]) == 0
    assert "fc" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["monitor", str(tmp_path / "bad.jsonl")]) == 2
    assert "is not a JSON record" in capsys.readouterr().err


def test_tensorboard_sink(tmp_path, monkeypatch):
    """The sink's writes, against a stand-in SummaryWriter (tensorboard is an optional extra)."""
    import sys
    import types

    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def add_text(self, tag, text, step):
            written.append((tag, text, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    sink = fqt.TensorBoardSink(tmp_path / "tb")
    sink({"kind": "forward", "step": 3, "graph": 0, "site": "0.0", "module": "fc", "gemm": "output", "rel_error": 0.1,
          "sqnr_db": float("nan"), "nonfinite": 0})
    sink({"kind": "alert", "step": 4, "message": "fqt monitor: ..."})
    sink.close()
    assert ("fqt/forward/rel_error/0.0 fc output", 0.1, 3) in written
    assert not any("sqnr_db" in str(w[0]) for w in written)  # non-finite values are not written
    assert ("fqt/alert", "fqt monitor: ...", 4) in written


def test_tensorboard_sink_needs_tensorboard(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it fails
    with pytest.raises(fqt.OptionsError, match="pip install tensorboard"):
        fqt.TensorBoardSink("tb")


@pytest.mark.parametrize("options", [{"execution": "kernels", "inductor": False},
                                     {"execution": "kernels", "inductor": False, "recipe": "bhq8"}], ids=["int8", "bhq8"])
def test_kernels_execution_and_evaluation(options):
    """Eager kernels execution: the plain graphs keep their low-bit kernels, the monitored one
    measures; a torch.no_grad call (its own graph) is not monitored."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DigitsNet(8)
    mon = fqt.Monitor(every=2, warn=False)
    be = fqt.backend(monitor=mon, **options)
    step = torch.compile(model, backend=be)
    for _ in range(3):
        F.cross_entropy(step(torch.randn(16, 1, 8, 8)), torch.arange(16) % 10).backward()
    assert {r["step"] for r in mon.records} == {0, 2} and mon.alerts == []
    assert any(g.status is fqt.GemmStatus.LOWBIT_KERNEL for d in be.records[0].decisions for g in d.gemms)
    before = len(mon.records)
    with torch.no_grad():
        step(torch.randn(16, 1, 8, 8))
    assert len(mon.records) == before


@pytest.mark.parametrize("bad, match", [
    ({"every": 0}, "sampling period"), ({"window": 2}, "window"), ({"sinks": [3]}, "sink"),
    ({"thresholds": {"clipped": 0.1}}, "fqt.Thresholds"), ({"policy": "adapt"}, "AdaptivePolicy"),
])
def test_monitor_arguments_are_validated(bad, match):
    with pytest.raises(fqt.OptionsError, match=match):
        fqt.Monitor(**bad)


def test_options_and_thresholds_are_validated():
    assert fqt.FQTConfig.from_options({"monitor": 10}).monitor.every == 10
    assert fqt.FQTConfig.from_options({"monitor": True}).monitor.every == 100
    assert fqt.FQTConfig.from_options({"monitor": False}).monitor is None
    with pytest.raises(fqt.OptionsError, match="monitor must be"):
        fqt.FQTConfig.from_options({"monitor": "often"})
    with pytest.raises(fqt.OptionsError, match="positive number"):
        fqt.Thresholds(clipped=-1)
    with pytest.raises(fqt.OptionsError, match="max_fixes"):
        fqt.AdaptivePolicy(max_fixes=0)


def test_monitoring_off_adds_no_node():
    """Without a monitor nothing changes; with one, the graphs that run on unmonitored steps are
    the very graphs of an unmonitored compile (the probes live in the other variant only)."""
    def graphs(**options):
        torch._dynamo.reset()
        torch.manual_seed(0)
        be = fqt.backend(recipe="int8", execution="reference", debug=True, **options)
        model = DigitsNet(8)
        step = torch.compile(model, backend=be)
        for _ in range(2):  # a monitor samples the first call: the second runs the plain graphs
            F.cross_entropy(step(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
        return [(name, text) for name, text, _ in be.records[0].stages if name in ("forward", "backward")]

    plain = graphs()
    assert plain == graphs(monitor=None)
    assert plain == graphs(monitor=fqt.Monitor(every=100))


# ------------------------------------------------------------------ compiled for real
_FRESH = r'''
import torch, warnings
import fqt_compiler as fqt
from fqt_compiler.sites import GemmStatus
g = torch.Generator().manual_seed(0)
# a convolution and a Linear: a site of each kind, every probe kind, both compiled variants (the
# fresh-process test of tests/test_fresh_process.py compiles the larger models unmonitored)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 10))
for name, model, x in [("conv-linear", model, torch.randn(4, 3, 16, 16, generator=g))]:
    mon = fqt.Monitor(every=2)
    be = fqt.backend(monitor=mon)  # defaults: int8, kernels, Inductor
    step = torch.compile(model, backend=be)
    for _ in range(3):
        model.zero_grad()
        step(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters()), name
    assert sorted({r["kind"] for r in mon.records}) == ["forward", "gradient", "quantizer"], name
    assert {r["step"] for r in mon.records} == {0, 2}, name
    assert mon.alerts == [], [a["message"] for a in mon.alerts]
    lowbit = [gm for d in be.records[0].decisions for gm in d.gemms if gm.status is GemmStatus.LOWBIT_KERNEL]
    assert lowbit, name  # the plain graphs still run the low-bit kernels
    print("OK", name, flush=True)
'''


@pytest.mark.slow
def test_monitor_on_real_models_in_a_fresh_process():
    """Kernels mode with Inductor, in a fresh process: both variants compile, the monitored
    steps report every kind of record, the other steps run the plain low-bit graphs."""
    import subprocess
    import sys

    from tests.test_fresh_process import _SCRIPT

    classes = _SCRIPT[:_SCRIPT.index("g = torch.Generator()")]
    proc = subprocess.run([sys.executable, "-c", classes + _FRESH], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["OK", "conv-linear"], proc.stdout


def test_monitor_on_attention():
    """A transformer block: attention's batched GEMMs get quantizer and forward records (no weight
    gradient to measure), F.scaled_dot_product_attention stays unmonitored high precision."""
    from tests.test_fresh_process import _SCRIPT

    namespace: dict = {}
    exec(_SCRIPT[:_SCRIPT.index("class TokenConv")], namespace)  # the model classes of the fresh-process test
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = namespace["Block"]()
    mon = fqt.Monitor(every=1, warn=False)
    step = torch.compile(model, backend=fqt.backend(execution="reference", monitor=mon))
    step(torch.randn(2, 8, 32)).square().mean().backward()
    by_kind = {k: {r["module"] for r in mon.records if r["kind"] == k} for k in ("forward", "gradient", "quantizer")}
    assert by_kind["gradient"] == {"qkv", "proj", "fc", "out"}
    assert by_kind["forward"] == by_kind["quantizer"] == {"qkv", "proj", "fc", "out"}
    assert mon.alerts == []


def test_graphs_of_one_monitor_get_distinct_names():
    """backend="fqt" builds a backend per graph: the monitor numbers the graphs it watches, so a
    graph break still leaves every site one name (and the decision table the same one)."""
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return self.b(x)

    torch._dynamo.reset()
    torch.manual_seed(0)
    mon = fqt.Monitor(every=1, warn=False)
    step = torch.compile(Broken(), backend="fqt", options={"execution": "reference", "monitor": mon})
    F.cross_entropy(step(torch.randn(6, 8)), torch.arange(6) % 4).backward()
    names = {(r["site"], r["module"]) for r in mon.records if r["kind"] == "forward"}
    assert names == {("0.0", "a"), ("1.0", "b")}
    tables = {f"{d.graph_id}.{d.site_id}": d.module_path for r in fqt.last_compiles()[-2:] for d in r.decisions}
    assert tables == {"0.0": "a", "1.0": "b"}


def test_json_lines_write_non_finite_quantities_as_null(tmp_path):
    sink = fqt.JsonLinesSink(tmp_path / "nan.jsonl")
    sink({"kind": "gradient", "step": 0, "site": "0.0", "own_var": float("nan"), "bias_z": float("inf"), "nonfinite": 3})
    sink.close()
    (record,) = read_log(tmp_path / "nan.jsonl")
    assert record["own_var"] is None and record["bias_z"] is None and record["nonfinite"] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_monitor_on_cuda(recipe):
    """The monitored variant on CUDA with Inductor: the probes traced into Triton kernels, the
    plain graphs on the low-bit kernels, records from both passes, no alert."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DigitsNet(16).cuda()
    mon = fqt.Monitor(every=2, warn=False)
    be = fqt.backend(recipe=recipe, monitor=mon)
    step = torch.compile(model, backend=be)
    x, y = torch.randn(64, 1, 8, 8, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(step(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sorted({r["kind"] for r in mon.records}) == ["forward", "gradient", "quantizer"]
    assert {r["step"] for r in mon.records} == {0, 2} and mon.alerts == []
    assert any(g.status is fqt.GemmStatus.LOWBIT_KERNEL for d in be.records[0].decisions for g in d.gemms)


def test_policy_ladder_ends_in_high_precision():
    """An 8-bit gradient quantizer that still alerts (a threshold set absurdly low) has no more
    bits to gain: the policy's one rung is high precision for that site's backward GEMMs, and a
    fixed site's later alerts add nothing more than max_fixes allows."""
    policy = fqt.AdaptivePolicy(max_fixes=1)
    x, y = _data()
    torch.manual_seed(0)
    model = DigitsNet(8)
    mon = fqt.Monitor(every=2, policy=policy, warn=False, thresholds=fqt.Thresholds(variance_ratio=1e-12))
    be = fqt.backend(recipe="int8", execution="reference", monitor=mon)
    sgd_steps(model, torch.compile(model, backend=be), x, y, 6)
    assert len(policy.fixes) == 1 and policy.fixes[0].high_precision is not None
    fixed = policy.fixes[0].module[4:-1].replace("\\", "")
    site = next(d for d in be.records[0].decisions if d.module_path == fixed)
    backward = [g for g in site.gemms if g.kind is not fqt.GemmKind.OUTPUT]
    assert backward and all(g.status is fqt.GemmStatus.SKIPPED and g.rule.startswith("rule monitor:") for g in backward)
    assert all(r["module"] != fixed for r in mon.records if r["kind"] == "gradient" and r["step"] > 0)
