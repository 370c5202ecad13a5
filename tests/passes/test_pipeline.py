"""The fqt passes run directly on captured AOTAutograd joint graphs.

A joint graph is captured with a custom backend built from ``aot_autograd`` whose
``partition_fn`` deep-copies the joint graph module before partitioning; the passes then run on
the copy with the pipeline's rewrite steps (``fqt_compiler.pipeline.rewrite_graph``).

Quantization ops: ``fqt::quantize`` (deterministic, forward operands), and the stochastic
``fqt::quantize_stochastic`` (codes + dequantization) / ``fqt::fake_quantize`` (BHQ) on
grad_output, one per backward GEMM.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import pytest
import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

import fqt_compiler as fqt
from fqt_compiler import passes, pipeline
from fqt_compiler.sites import GemmNodeInfo, GemmStatus, QuantNodeInfo
from fqt_compiler.specs import GemmKind, TensorRole
from fqt_compiler.passes.dedupe import Dedupe
from fqt_compiler.passes.verify import verify_graph

from tests.helpers.models import SharedInputLinears, make_case

aten = torch.ops.aten
QUANTIZE = torch.ops.fqt.quantize.default
QUANTIZE_STOCHASTIC = torch.ops.fqt.quantize_stochastic.default
FAKE_QUANTIZE = torch.ops.fqt.fake_quantize.default
BHQ_QUANTIZE = torch.ops.fqt.bhq_quantize.default
BHQ_INVERSE = torch.ops.fqt.bhq_inverse.default
QUANT_OPS = (QUANTIZE, QUANTIZE_STOCHASTIC, FAKE_QUANTIZE, BHQ_QUANTIZE)
STOCHASTIC_OPS = (QUANTIZE_STOCHASTIC, FAKE_QUANTIZE, BHQ_QUANTIZE)
GEMM_TARGETS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- capture
@dataclass
class Captured:
    joint: fx.GraphModule
    param_indices: frozenset[int]
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None
    ctx: passes.PassContext | None = None


def capture(model: torch.nn.Module, *inputs: torch.Tensor, run_recipe: str | None = None) -> Captured:
    """Compile ``model``, run one forward and return a deep copy of its joint graph.

    With ``run_recipe`` the passes also run on the real joint graph before the min-cut
    partitioner (as the fqt backend does), and the partitioned forward/backward graphs are kept.
    """
    store: dict = {}

    def backend(gm: fx.GraphModule, example_inputs: list):
        store["param_indices"] = frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))

        def partition_fn(joint: fx.GraphModule, joint_inputs, **kwargs):
            store["joint"] = copy.deepcopy(joint)
            if run_recipe is not None:
                config = fqt.FQTConfig.from_options({"recipe": run_recipe, "debug": True})
                ctx = passes.PassContext(config, param_indices=store["param_indices"])
                pipeline.rewrite_graph(joint, ctx)
                store["ctx"] = ctx
            return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

        def fw_compiler(g: fx.GraphModule, _inputs):
            store["forward"] = g
            return make_boxed_func(g.forward)

        def bw_compiler(g: fx.GraphModule, _inputs):
            store["backward"] = g
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition_fn)(gm, example_inputs)

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*inputs)
    return Captured(store["joint"], store["param_indices"], store.get("forward"), store.get("backward"), store.get("ctx"))


def run(cap: Captured, recipe: str = "psq8") -> tuple[fx.GraphModule, passes.PassContext]:
    gm = copy.deepcopy(cap.joint)
    config = fqt.FQTConfig.from_options({"recipe": recipe, "debug": True})
    ctx = passes.PassContext(config, param_indices=cap.param_indices)
    out = pipeline.rewrite_graph(gm, ctx)
    assert out is gm
    return gm, ctx


def nodes(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def count(gm: fx.GraphModule, target) -> int:
    return len(nodes(gm, target))


def case_capture(name: str) -> Captured:
    case = make_case(name)
    return capture(case.model, *case.inputs)


def stochastic_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in STOCHASTIC_OPS]


def quant_source(node) -> fx.Node | None:
    """The fqt quantization op a GEMM argument comes from (through getitem, the dequantization
    and replayed views), or None when the argument is not a quantized value."""
    cur = node
    for _ in range(32):
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return None
        if cur.target in QUANT_OPS:
            return cur
        if not isinstance(cur.meta.get("fqt"), QuantNodeInfo) and cur.target is not operator.getitem:
            return None
        cur = cur.args[0]
    return None


def gemms_fed_by(node: fx.Node) -> set[fx.Node]:
    """GEMM nodes reached from a quantization node through getitems and its dequantization."""
    found, stack, seen = set(), [node], {node}
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if user.target in GEMM_TARGETS or user.target in (aten.convolution.default, aten.convolution_backward.default):
                found.add(user)
            elif user.target is operator.getitem or isinstance(user.meta.get("fqt"), QuantNodeInfo):
                stack.append(user)
    return found


def gemm_nodes(gm: fx.GraphModule, kind: GemmKind | None = None) -> list[fx.Node]:
    return [
        n for n in gm.graph.nodes
        if isinstance(n.meta.get("fqt"), GemmNodeInfo) and (kind is None or n.meta["fqt"].gemm is kind)
    ]


def grad_arg(gemm: fx.Node) -> int:
    """Index of the quantized grad_output argument of a backward GEMM node."""
    (idx,) = [
        i for i in gemm.meta["fqt"].quantized_args
        if quant_source(gemm.args[i]) is not None and quant_source(gemm.args[i]).meta["fqt"].role is TensorRole.GRAD_OUTPUT
    ]
    return idx


# --------------------------------------------------------------------------- node counts
# (sites, deterministic forward quantizations, stochastic grad_output quantizations) under psq8:
# every site quantizes its 2 forward operands; every backward GEMM gets its own grad_output draw
EXPECTED = {
    "mlp": (3, 6, 5),  # fc1 has no grad_input
    "cnn": (5, 10, 9),  # conv1 has no grad_input
    "gpt": (7, 14, 14),  # 5 Linears + 2 attention matmuls
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quantize_node_counts_before_and_after(name):
    cap = case_capture(name)
    for op in QUANT_OPS:
        assert count(cap.joint, op) == 0
    gm, ctx = run(cap)
    n_sites, n_quantize, n_stochastic = EXPECTED[name]
    # the rewrite passes, then (kernels mode, fusion on: the defaults) the saved codes' layout
    assert ctx.ran == ["find_sites", "select_specs", "insert_qdq", "dedupe", "mark_saved_codes"]
    # the graph after each rewrite pass (mark_saved_codes only sets metadata)
    assert [t for t, _ in ctx.graph_texts] == ["input", *ctx.ran[:4]]
    assert len(ctx.decisions) == n_sites
    assert ctx.counters["dedupe.merged"] == 0
    assert count(gm, QUANTIZE) == n_quantize
    assert len(stochastic_nodes(gm)) == n_stochastic
    n_gemms = sum(len(s.gemms) for s in ctx.decisions)
    assert n_stochastic == n_gemms - n_sites  # one grad_output quantization per backward GEMM
    # every quantization node is marked with its site and role
    for n in nodes(gm, QUANTIZE):
        info = n.meta.get("fqt")
        assert isinstance(info, QuantNodeInfo) and info.gemm is GemmKind.OUTPUT, n.name
        assert info.role in (TensorRole.ACTIVATION, TensorRole.WEIGHT)
    for n in stochastic_nodes(gm):
        info = n.meta.get("fqt")
        assert isinstance(info, QuantNodeInfo), n.name
        assert info.role is TensorRole.GRAD_OUTPUT and info.gemm is not GemmKind.OUTPUT
        assert fqt.QuantSpec.from_key(n.args[1]).is_stochastic
        assert len(gemms_fed_by(n)) == 1, f"{n.name} feeds {gemms_fed_by(n)}"
    # every GEMM the passes decided on reads its quantized arguments from fqt nodes
    assert len(gemm_nodes(gm)) == n_gemms
    for g in gemm_nodes(gm):
        for i in g.meta["fqt"].quantized_args:
            assert quant_source(g.args[i]) is not None, f"{g.name} arg {i}"
    # the original capture is untouched (the passes ran on a copy)
    assert count(cap.joint, QUANTIZE) == 0


def test_exact_recipe_inserts_nothing():
    cap = case_capture("mlp")
    before = len(cap.joint.graph.nodes)
    gm, ctx = run(cap, "exact")
    for op in QUANT_OPS:
        assert count(gm, op) == 0
    assert len(gm.graph.nodes) == before
    assert all(g.status is GemmStatus.SKIPPED for s in ctx.decisions for g in s.gemms)


def test_bhq_quantizes_grad_input_with_codes_and_an_inverse_transform():
    gm, ctx = run(case_capture("mlp"), "bhq4")
    # BHQ on the 2 grad_input GEMMs (codes of T dY, then T^-1); per-column codes on the 3 grad_weight GEMMs
    assert count(gm, BHQ_QUANTIZE) == 2 and count(gm, BHQ_INVERSE) == 2
    assert count(gm, QUANTIZE_STOCHASTIC) == 3
    assert count(gm, FAKE_QUANTIZE) == 0
    for n in nodes(gm, BHQ_QUANTIZE):
        assert n.meta["fqt"].gemm is GemmKind.GRAD_INPUT
        assert fqt.QuantSpec.from_key(n.args[1]) == fqt.recipe("bhq4").grad_input.grad_output
    for n in nodes(gm, BHQ_INVERSE):  # the inverse transform consumes this quantization's own T
        (q,) = {a.args[0] for a in n.args[1:4]}
        assert q.target is BHQ_QUANTIZE


# --------------------------------------------------------------------------- decisions
def test_decisions_per_site_mlp():
    cap = case_capture("mlp")
    _, ctx = run(cap, "psq8")
    r = fqt.recipe("psq8")
    assert [s.module_path for s in ctx.decisions] == ["fc1", "fc2", "fc3"]
    assert all(s.op == "aten.addmm" and s.rule == "recipe psq8" for s in ctx.decisions)
    kinds = [[g.kind for g in s.gemms] for s in ctx.decisions]
    assert kinds[0] == [GemmKind.OUTPUT, GemmKind.GRAD_WEIGHT]
    for k in kinds[1:]:
        assert sorted(x.value for x in k) == ["grad_input", "grad_weight", "output"]
    for site in ctx.decisions:
        for g in site.gemms:
            assert g.status is GemmStatus.SIMULATED
            ops = {o.role: o for o in g.operands}
            if g.kind is GemmKind.OUTPUT:
                assert ops[TensorRole.ACTIVATION].spec == r.output.activation
                assert ops[TensorRole.WEIGHT].spec == r.output.weight
                assert g.shape.startswith("6x")
            elif g.kind is GemmKind.GRAD_INPUT:
                assert ops[TensorRole.GRAD_OUTPUT].spec == r.grad_input.grad_output
                assert ops[TensorRole.WEIGHT].spec == r.output.weight
                assert ops[TensorRole.WEIGHT].source == "reuses output quantization"
            else:
                assert ops[TensorRole.GRAD_OUTPUT].spec == r.grad_weight.grad_output
                assert ops[TensorRole.ACTIVATION].source == "reuses output quantization"


def test_decisions_int8_requantizes_backward_operands():
    cap = case_capture("mlp")
    gm, ctx = run(cap, "int8")
    r = fqt.recipe("int8")
    for site in ctx.decisions:
        for g in site.gemms:
            ops = {o.role: o for o in g.operands}
            if g.kind is GemmKind.GRAD_INPUT:
                assert ops[TensorRole.WEIGHT].spec == r.grad_input.weight
                assert ops[TensorRole.WEIGHT].source == "re-quantized from output quantization"
            elif g.kind is GemmKind.GRAD_WEIGHT:
                assert ops[TensorRole.ACTIVATION].spec == r.grad_weight.activation
    # 6 forward quantizations + 2 grad_input weights + 3 grad_weight activations re-quantized
    assert count(gm, QUANTIZE) == 6 + 2 + 3
    assert len(stochastic_nodes(gm)) == 5


# --------------------------------------------------------------------------- convolution_backward
def test_convolution_backward_is_split_per_gemm():
    cap = case_capture("cnn")
    before = nodes(cap.joint, aten.convolution_backward.default)
    masks_before = sorted(tuple(n.args[10]) for n in before)
    # conv1 (input needs no grad): grad_weight only; gconv, dwconv: input + weight; pwconv: + bias
    assert masks_before == sorted(
        [(False, True, False), (True, True, False), (True, True, False), (True, True, True)]
    ), masks_before
    gm, ctx = run(cap, "psq8")
    after = nodes(gm, aten.convolution_backward.default)
    assert len(after) == 1 + 2 + 2 + 2  # one per GEMM; pwconv's grad_bias is a reduction now
    # grad_bias: the high-precision grad_output summed over all dims but its channels, reading
    # neither the input nor the weight (the partitioner need not save them for it)
    (bias,) = [n for n in nodes(gm, aten.sum.dim_IntList) if n.meta.get("seq_nr") is not None
               and any(n.meta["seq_nr"] == b.meta.get("seq_nr") for b in before if b.args[10][2])]
    assert list(bias.args[1]) == [0, 2, 3] and quant_source(bias.args[0]) is None
    r = fqt.recipe("psq8")
    sources = []
    kinds = {GemmKind.GRAD_INPUT: 0, GemmKind.GRAD_WEIGHT: 0}
    for n in after:
        mask = list(n.args[10])
        assert sum(mask) == 1, f"{n.name} still computes {mask}"
        info = n.meta.get("fqt")
        source = quant_source(n.args[0])
        assert not mask[2], f"{n.name} computes grad_bias"
        assert isinstance(info, GemmNodeInfo)
        assert info.gemm is (GemmKind.GRAD_INPUT if mask[0] else GemmKind.GRAD_WEIGHT)
        assert 0 in info.quantized_args
        assert source is not None and source.target in STOCHASTIC_OPS, f"{n.name}: grad_output not quantized"
        want = r.grad_input.grad_output if mask[0] else r.grad_weight.grad_output
        assert fqt.QuantSpec.from_key(source.args[1]) == want
        # the forward operand this GEMM consumes is the forward's quantized value (reuse)
        fwd_arg = 2 if mask[0] else 1
        assert quant_source(n.args[fwd_arg]) is not None and quant_source(n.args[fwd_arg]).target is QUANTIZE
        sources.append(source)
        kinds[info.gemm] += 1
    assert kinds == {GemmKind.GRAD_INPUT: 3, GemmKind.GRAD_WEIGHT: 4}
    # a separate grad_output quantization per GEMM
    assert len(set(sources)) == len(sources) == 7
    # the grad_input and grad_weight GEMMs of one conv quantize the same high-precision grad_output
    by_input: dict[fx.Node, int] = {}
    for src in sources:
        by_input[src.args[0]] = by_input.get(src.args[0], 0) + 1
    assert sorted(by_input.values()) == [1, 2, 2, 2]


# --------------------------------------------------------------------------- dedupe
def _root(node: fx.Node) -> fx.Node:
    """Walk view ops back to the tensor they view."""
    views = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.t.default, aten.alias.default}
    while node.op == "call_function" and node.target in views:
        node = node.args[0]
    return node


SHARED_INPUT_SHAPES = pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8)], ids=["2d-input", "3d-input"])


def _shared_input_capture(shape) -> tuple[Captured, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    return capture(SharedInputLinears(), x), x


def run_unverified(cap: Captured, recipe: str) -> tuple[fx.GraphModule, passes.PassContext]:
    """The pipeline's passes in order, without the verifier (to look at what dedupe did)."""
    gm = copy.deepcopy(cap.joint)
    ctx = passes.PassContext(fqt.FQTConfig.from_options({"recipe": recipe}), param_indices=cap.param_indices)
    graph_ctx = pipeline.GraphContext(ctx.config, pipeline.Stage.JOINT, rewrite=ctx)
    for step in pipeline.steps_for(pipeline.Stage.JOINT, ctx.config):
        step.run(gm, graph_ctx)
        ctx.ran.append(step.name)
    return gm, ctx


def _depends_on(node: fx.Node, target: fx.Node, depth: int = 8) -> bool:
    if node is target:
        return True
    if depth == 0:
        return False
    return any(_depends_on(a, target, depth - 1) for a in node.all_input_nodes)


@SHARED_INPUT_SHAPES
def test_dedupe_shares_the_quantization_of_a_shared_activation(shape):
    """q and k projections of one input: one quantization of the input, not two."""
    cap, x = _shared_input_capture(shape)
    gm, ctx = run_unverified(cap, "psq8")
    act_key = fqt.recipe("psq8").output.activation.key()
    placeholders = {
        n for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
        if n.meta["val"].shape == x.shape and n.name.startswith("primals") and i not in cap.param_indices
    }
    assert len(placeholders) == 1
    (x_ph,) = placeholders
    on_x = [n for n in nodes(gm, QUANTIZE) if _root(n.args[0]) is x_ph and n.args[1] == act_key]
    assert ctx.counters["dedupe.merged"] > 0, (
        f"dedupe merged nothing; quantizations of the shared input: {[n.format_node() for n in on_x]}"
    )
    assert len(on_x) == 1, f"{len(on_x)} quantizations of the shared input: {[n.format_node() for n in on_x]}"
    # both forward GEMMs consume the one dequantized copy
    (q,) = on_x
    fwd = gemm_nodes(gm, GemmKind.OUTPUT)
    assert len(fwd) == 2
    for g in fwd:
        assert _depends_on(g, q)
    # stochastic quantizations were left alone: one per backward GEMM
    assert len(stochastic_nodes(gm)) == 4


def test_dedupe_also_shares_the_dequantization():
    """dedupe.py: "the later one and its dequantization are replaced by the earlier ones", so
    both forward GEMMs read one dequantized copy of the shared input (2-D input: no views)."""
    cap, _ = _shared_input_capture((6, 8))
    gm, ctx = run_unverified(cap, "psq8")
    fwd = gemm_nodes(gm, GemmKind.OUTPUT)
    act_args = {g.args[1] for g in fwd}  # addmm(bias, activation, weight)
    assert len(act_args) == 1, f"the forward GEMMs read {len(act_args)} dequantized copies: {[a.name for a in act_args]}"


@SHARED_INPUT_SHAPES
def test_pipeline_verifies_after_dedupe_of_a_shared_activation(shape):
    """The verifier must accept what dedupe produced (the pipeline always verifies at the end of the rewrite)."""
    cap, _ = _shared_input_capture(shape)
    for recipe in ("psq8", "int8"):
        gm, ctx = run(cap, recipe)
        verify_graph(gm, "test")


def _duplicate(gm: fx.GraphModule, orig: fx.Node) -> fx.Node:
    """Insert an identical copy of ``orig`` (same args and metadata) kept alive as an output."""
    graph = gm.graph
    with graph.inserting_after(orig):
        dup = graph.call_function(orig.target, orig.args, dict(orig.kwargs))
    dup.meta.update(orig.meta)
    keep = dup
    if isinstance(orig.meta["val"], (tuple, list)):
        with graph.inserting_after(dup):
            keep = graph.call_function(operator.getitem, (dup, 0))
        keep.meta["val"] = orig.meta["val"][0]
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (list(out.args[0]) + [keep],)
    return dup


def test_dedupe_never_merges_stochastic_quantizations():
    """Duplicate a deterministic and both kinds of stochastic quantization by hand: dedupe
    merges only the deterministic one."""
    cap = case_capture("mlp")
    gm, ctx = run(cap, "bhq8")  # BHQ grad_input: bhq_quantize; per-column grad_weight: quantize_stochastic
    det, sto, opaque = nodes(gm, QUANTIZE)[0], nodes(gm, QUANTIZE_STOCHASTIC)[0], nodes(gm, BHQ_QUANTIZE)[0]
    dups = [_duplicate(gm, n) for n in (det, sto, opaque)]
    gm.recompile()
    before = {op: count(gm, op) for op in QUANT_OPS}
    ctx2 = passes.PassContext(ctx.config)
    Dedupe().run(gm, ctx2)
    assert ctx2.counters["dedupe.merged"] >= 1
    assert count(gm, QUANTIZE) == before[QUANTIZE] - 1, "identical deterministic quantizations were not merged"
    assert dups[0] not in gm.graph.nodes
    assert count(gm, QUANTIZE_STOCHASTIC) == before[QUANTIZE_STOCHASTIC], "a stochastic quantization was merged"
    assert count(gm, BHQ_QUANTIZE) == before[BHQ_QUANTIZE], "a stochastic BHQ quantization was merged"
    assert dups[1] in gm.graph.nodes and dups[2] in gm.graph.nodes


@pytest.mark.parametrize("recipe", ["bhq4", "int8"])
def test_full_graph_stochastic_nodes_each_feed_one_gemm(recipe):
    gm, ctx = run(case_capture("gpt"), recipe)
    stochastic = stochastic_nodes(gm)
    assert stochastic
    fed = []
    for n in stochastic:
        users = gemms_fed_by(n)
        assert len(users) == 1, f"{n.name} feeds {[u.name for u in users]}"
        fed.extend(users)
    # and no GEMM reads two draws
    assert len(set(fed)) == len(fed)


# --------------------------------------------------------------------------- verify
def test_verify_accepts_the_rewritten_graph():
    gm, _ = run(case_capture("cnn"), "bhq5")
    verify_graph(gm, "test")


def test_verify_rejects_a_gemm_reading_the_high_precision_input():
    cap = case_capture("mlp")
    gm, _ = run(cap, "psq8")
    fwd = gemm_nodes(gm, GemmKind.OUTPUT)[0]
    idx = fwd.meta["fqt"].quantized_args[0]
    q = quant_source(fwd.args[idx])
    assert q is not None and q.target is QUANTIZE
    fwd.update_arg(idx, q.args[0])  # the high-precision input of the quantization
    gm.recompile()
    with pytest.raises(fqt.PassError, match=fwd.name):
        verify_graph(gm, "broken-by-test")


@pytest.mark.parametrize("recipe", ["psq8", "bhq8"])
def test_verify_rejects_a_shared_stochastic_quantization(recipe):
    """Make a grad_weight GEMM read its sibling grad_input GEMM's grad_output draw."""
    cap = case_capture("mlp")
    gm, ctx = run(cap, recipe)
    fc3 = ctx.decisions[-1]
    gi = next(n for n in gemm_nodes(gm, GemmKind.GRAD_INPUT) if n.meta["fqt"].site_id == fc3.site_id)
    gw = next(n for n in gemm_nodes(gm, GemmKind.GRAD_WEIGHT) if n.meta["fqt"].site_id == fc3.site_id)
    gw.update_arg(grad_arg(gw), gi.args[grad_arg(gi)])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    with pytest.raises(fqt.PassError, match="independent"):
        verify_graph(gm, "broken-by-test")


def test_verify_rejects_a_node_without_fake_value():
    cap = case_capture("mlp")
    gm, _ = run(cap, "psq8")
    node = nodes(gm, QUANTIZE)[0]
    del node.meta["val"]
    with pytest.raises(fqt.PassError, match=node.name):
        verify_graph(gm, "broken-by-test")


# --------------------------------------------------------------------------- saved tensors
class TwoLayerMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("recipe", ["qat", "int8"])
def test_partitioner_saves_low_bit_codes(recipe):
    """The forward graph's outputs beyond the user output are the tensors saved for backward:
    the quantized GEMM operands should be saved as low-bit codes, not as dequantized fp32 copies."""
    torch.manual_seed(0)
    cap = capture(TwoLayerMLP(), torch.randn(6, 8, requires_grad=True), run_recipe=recipe)
    assert cap.forward is not None and cap.ctx is not None
    out = next(n for n in cap.forward.graph.nodes if n.op == "output")
    saved = [a for a in out.args[0][1:] if isinstance(a, fx.Node)]
    dtypes = {a.name: a.meta["val"].dtype for a in saved}
    low_bit = [n for n, d in dtypes.items() if d in (torch.int8, torch.uint8)]
    assert low_bit, f"{recipe}: no low-bit tensor saved for backward; saved: {dtypes}"
    # no dequantized (high-precision) copy of a quantized operand is saved
    dequantized = [
        a.name for a in saved
        if isinstance(a.meta.get("fqt"), QuantNodeInfo) and a.meta["fqt"].what in ("dequantize", "replay")
        and a.meta["val"].is_floating_point()
    ]
    assert not dequantized, f"{recipe}: dequantized fp32 operands saved for backward: {dequantized}; saved: {dtypes}"
