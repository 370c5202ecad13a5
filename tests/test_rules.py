"""Placement rules: precedence, every matcher, every action, the built-in helpers, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.specs import GemmKind

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """stem (8->16), body.0 / body.1 (16->16), head (16->4), plus an attention-like bmm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(torch.relu(self.stem(x)))
        h = torch.bmm(h.unsqueeze(0), h.unsqueeze(0).transpose(1, 2)).squeeze(0) @ h
        return self.head(h)


def _explain(*rules, recipe="int8", **kw):
    return fqt.explain(Net(), torch.randn(6, 8), recipe=recipe, execution="reference", rules=list(rules), **kw)


def _by_module(report):
    out = {}
    for site, g in report.rows():
        out.setdefault(site.module_path, {})[g.kind] = g
    return out


def test_no_rules_means_the_recipe_decides():
    for _, g in _explain().rows():
        assert g.rule == "recipe int8" and g.status is fqt.GemmStatus.SIMULATED


def test_first_matching_rule_wins():
    r1 = fqt.Rule(name="body-hp", module="body.*", high_precision="sensitive")
    r2 = fqt.Rule(name="all-psq", recipe="psq8")
    rows = _by_module(_explain(r1, r2))
    assert all(g.rule == "rule body-hp" and g.status is fqt.GemmStatus.SKIPPED for g in rows["body.0"].values())
    assert all(g.rule == "rule all-psq" for g in rows["head"].values())
    # the other order: the catch-all shadows the second rule entirely
    rows = _by_module(_explain(r2, r1))
    assert all(g.rule == "rule all-psq" for m in rows.values() for g in m.values())


@pytest.mark.parametrize("rule,hit", [
    (dict(op="bmm"), {"<root>"}),
    (dict(op=("mm", "bmm")), {"<root>"}),
    (dict(module="body.1"), {"body.1"}),
    (dict(module="re:^(stem|head)$"), {"stem", "head"}),
    (dict(module="*"), {"stem", "body.0", "body.1", "head", "<root>"}),
    (dict(where=lambda s: s.dims[1] == 8), {"stem"}),  # K = 8 only for the stem
], ids=["op", "op-tuple", "module-glob", "module-regex", "module-any", "where"])
def test_each_matcher(rule, hit):
    report = _explain(fqt.Rule(name="r", high_precision="test", **rule))
    matched = {s.module_path for s, g in report.rows() if g.rule == "rule r"}
    assert matched == hit


def test_dim_bounds():
    report = fqt.explain(nn.Linear(64, 8), torch.randn(32, 64), recipe="int8", execution="reference",
                         rules=[fqt.Rule(name="wide", min_dim=9, high_precision="x"),
                                fqt.Rule(name="narrow", max_dim=8, recipe="qat")])
    assert {g.rule for _, g in report.rows()} == {"rule narrow"}  # smallest dim is N = 8


def test_gemm_matcher_and_specs_action():
    spec = fqt.QuantSpec(format="int", bits=4, scheme="asym", granularity="row", rounding="stochastic")
    rule = fqt.Rule(name="gi4", gemm="grad_input", specs={"grad_input.grad_output": spec})
    rows = _by_module(_explain(rule))
    gi = rows["body.1"][GemmKind.GRAD_INPUT]
    assert gi.rule == "rule gi4"
    assert {o.role.value: o.spec for o in gi.operands}["grad_output"] == spec
    # roles the rule does not name follow the recipe
    assert {o.role.value: o.spec for o in gi.operands}["weight"] == fqt.recipe("int8").grad_input.weight
    assert rows["body.1"][GemmKind.OUTPUT].rule == "recipe int8"


def test_recipe_action_and_strict_mode_accepts_rule_skips():
    report = _explain(fqt.keep_first_and_last(), fqt.Rule(name="bmm-exact", op="bmm", recipe="exact"), strict=True)
    rows = _by_module(report)
    assert all(g.status is fqt.GemmStatus.SKIPPED for m in ("stem", "head") for g in rows[m].values())
    assert all("first / last" in g.reason for g in rows["stem"].values())
    bmm = [g for site, g in report.rows() if site.op == "aten.bmm"]
    assert bmm and all(g.status is fqt.GemmStatus.SKIPPED and g.rule == "rule bmm-exact" for g in bmm)
    mm = [g for site, g in report.rows() if site.op == "aten.mm"]  # the `@ h` after it: recipe
    assert mm and all(g.rule == "recipe int8" for g in mm)
    assert all(g.status is fqt.GemmStatus.SIMULATED for g in rows["body.0"].values())


def test_skip_small_helper():
    report = fqt.explain(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8)), torch.randn(256, 256),
                         recipe="int8", execution="reference", rules=[fqt.skip_small(min_dim=64)])
    rows = _by_module(report)
    assert all(g.status is fqt.GemmStatus.SIMULATED for g in rows["0"].values())
    assert all(g.status is fqt.GemmStatus.SKIPPED and "too small" in g.reason for g in rows["1"].values())


def test_rules_change_the_gradients_as_asked():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    grads = {}
    for name, rules in (("exact", []), ("hp-rule", [fqt.Rule(name="all", high_precision="test")])):
        model.zero_grad()
        torch._dynamo.reset()
        recipe = "exact" if name == "exact" else "int8"
        torch.compile(model, backend=fqt.backend(recipe=recipe, execution="reference", rules=rules))(x).sum().backward()
        grads[name] = model.weight.grad.clone()
    assert torch.equal(grads["exact"], grads["hp-rule"])


def test_a_failing_rule_is_reported_with_its_name_and_node():
    def boom(site):
        raise KeyError("no such thing")

    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        _explain(fqt.Rule(name="explodes", where=boom, high_precision="x"))
    text = str(info.value)
    assert "rule 'explodes'" in text and "KeyError" in text and "node addmm" in text


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="r"), "exactly one action"),
    (dict(name="r", recipe="int8", high_precision="x"), "exactly one action"),
    (dict(name="r", gemm="grad_everything", recipe="int8"), "gemm='grad_everything'"),
    (dict(name="r", specs={"grad_input": None}), "'gemm.role'"),
    (dict(name="r", specs={"output.weight": "int8"}), "must be a QuantSpec"),
    (dict(name="r", high_precision=" "), "needs a reason"),
    (dict(name="", recipe="int8"), "non-empty"),
    (dict(name="r", recipe="int9"), "unknown recipe"),
])
def test_rule_validation(kwargs, message):
    with pytest.raises(fqt.SpecError, match=message):
        fqt.Rule(**kwargs)


def test_rules_are_part_of_the_config_identity():
    base = fqt.FQTConfig.from_options({"recipe": "int8"})
    ruled = fqt.FQTConfig.from_options({"recipe": "int8", "rules": [fqt.keep_first_and_last()]})
    assert base.uuid() != ruled.uuid()
    assert ruled.uuid() == fqt.FQTConfig.from_options({"recipe": "int8", "rules": [fqt.keep_first_and_last()]}).uuid()
    with pytest.raises(fqt.OptionsError, match="rules"):
        fqt.FQTConfig.from_options({"rules": ["keep first"]})


def test_rules_are_validated_at_construction():
    """Regression: an invalid regex was accepted and failed later, naming neither rule nor pattern."""
    with pytest.raises(fqt.SpecError, match=r"rule 'heads': module='re:\(unclosed' is not a valid regex"):
        fqt.Rule("heads", module="re:(unclosed", high_precision="x")
    with pytest.raises(fqt.SpecError, match="rule 'r': min_dim=8 > max_dim=4"):
        fqt.Rule("r", min_dim=8, max_dim=4, high_precision="x")
    with pytest.raises(fqt.SpecError, match="rule 'r': max_dim must be a non-negative int"):
        fqt.Rule("r", max_dim=-1, high_precision="x")
    with pytest.raises(fqt.SpecError, match="rule 'r': module must be"):
        fqt.Rule("r", module=3, high_precision="x")
    with pytest.raises(fqt.SpecError, match="rule 'r': op must be"):
        fqt.Rule("r", op=("mm", 3), high_precision="x")
    assert fqt.Rule("ok", module="re:^blocks\\.[0-9]+$", high_precision="x").module.startswith("re:")
