"""Analysis pass: choose the spec of every operand of every GEMM from the recipe.

Forward operands get ``recipe.output.<role>``. In a backward GEMM, ``grad_output`` gets the
recipe's spec for that GEMM (one independent quantization per backward GEMM: the paper's
biprecision) and the forward operand it consumes is treated as follows:

* the same spec as the forward: reuse the forward's quantized value (the paper's semantics:
  the backward GEMMs see the same quantized operands as the forward, straight-through);
* None: the backward GEMM uses the unquantized operand;
* another spec: re-quantize the forward's quantized value in this GEMM's layout (``int8``:
  per-in-channel weights for ``grad_input``, per-column activations for ``grad_weight``);
* activation x activation GEMMs (``grad_lhs`` / ``grad_rhs``) reuse the forward's, unless it is
  scaled per row, which no backward GEMM can realize: then it is re-quantized with the spec the
  recipe gives a Linear's operand in the same GEMM (``_batched_backward_operand``).

Placement rules (``fqt_compiler.rules``) come first: per GEMM, the first matching rule decides,
and the recipe decides the rest. Then every GEMM is given its status: simulated, or skipped
with a reason. Never mutates.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from fqt_compiler.config import Fusion
from fqt_compiler.errors import UnsupportedGraphError
from fqt_compiler.rules import Rule, SiteInfo, first_matching
from fqt_compiler.flops import node_flops
from fqt_compiler.sites import GemmDecision, GemmStatus, OperandDecision, OperandSource, SiteDecision, SkipKind
from fqt_compiler.conv_paths import cpu_conv_problem
from fqt_compiler.cost import Slot, site_cost
from fqt_compiler.int8_gemm import INT_MM, int8_gemm_provider
from fqt_compiler.specs import GemmKind, Granularity, QuantSpec, TensorRole

from fqt_compiler.passes import matchers as m
from fqt_compiler.passes.graph_utils import arg as call_arg
from fqt_compiler.passes.base import FQTPass, PassContext, Site


def _site_info(site: Site, index: int, count: int) -> SiteInfo:
    """What rules see: module, op, the forward GEMM's (M, K, N) and FLOPs, position."""
    node = site.node
    if node.target in m.CONV_OPS:
        x, w = (m.val_shape(a) for a in site.forward_operands)
        out = m.val_shape(node)
        spatial = out[2:] if out else ()
        dims = (_product(out[0], *spatial) or out[0], _product(*w[1:]) or w[1], w[0]) if out and w else ()
    else:
        a, b = (m.val_shape(node.args[i]) for i in m.MATMUL_OPERANDS[node.target])
        dims = (a[-2], a[-1], b[-1]) if a and b else ()
    _, flops = _shape_and_flops(node, site)
    return SiteInfo(site.module_path, site.op.removeprefix("aten."), node.name, tuple(dims), flops, index, count)


def _product(*dims: object) -> int:
    """Product of static sizes; 0 (unknown) if any is symbolic. Never int() a SymInt: that
    would guard on its current value and make Dynamo recompile for every new batch size."""
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return 0
        out *= d
    return out


def _shape_and_flops(node: fx.Node, site: Site) -> tuple[str, int]:
    out = m.val_shape(node)
    if site.node.target in m.CONV_OPS:
        x, w = (m.val_shape(a) for a in site.forward_operands)
        if out is None or w is None:
            return "?", 0
        # every (input, weight) product once: a convolution's output positions times the weight's
        # window, a transposed one's input positions (each spread over its output window)
        spread = x if call_arg(site.node, "transposed") else out
        return f"x{list(x)} w{list(w)}", _product(2, *spread, *w[1:])
    a, b = (m.val_shape(node.args[i]) for i in m.MATMUL_OPERANDS[node.target])
    if a is None or b is None:
        return "?", 0
    dims = (*a, b[-1])  # (M, K, N) or (B, M, K, N)
    return "x".join(str(d) for d in dims), _product(2, *dims)


class SelectSpecs(FQTPass):
    name = "select_specs"
    requires = ("find_sites",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        recipe = ctx.config.recipe
        live = [site for site in ctx.sites if site.skip is None]
        for site in ctx.sites:
            site.rule = f"recipe {recipe.name}"
            if site.skip is None:
                info = _site_info(site, live.index(site), len(live))
                self._choose(site, info, ctx)
                if ctx.config.never_slower:
                    self._apply_cost_model(site, info, ctx.config)
            ctx.decisions.append(self._decide(site, ctx))

    @staticmethod
    def _apply_cost_model(site: Site, info: SiteInfo, config) -> None:
        """``never_slower``: a site the roofline says cannot win stays in high precision."""
        val = site.node.meta.get("val")
        dims = info.dims
        if not isinstance(val, torch.Tensor) or len(dims) != 3 or not all(isinstance(d, int) for d in dims):
            return  # symbolic sizes: no estimate, the recipe's choice stands (documented)
        specs = {(GemmKind.OUTPUT, Slot.LHS): site.fwd_specs[0], (GemmKind.OUTPUT, Slot.RHS): site.fwd_specs[1]}
        for bwd in site.backward:
            if bwd.skip is None:
                # by the forward operand it reads (a bmm's grad_lhs / grad_rhs cost the same way)
                gemm, other = (GemmKind.GRAD_INPUT, Slot.RHS) if bwd.fwd_operand == 1 else (GemmKind.GRAD_WEIGHT, Slot.LHS)
                specs[(gemm, Slot.GRAD)] = bwd.grad_spec
                specs[(gemm, other)] = bwd.operand_spec
        conv = site.node.target in m.CONV_OPS
        batched = site.node.target in m.BATCHED_MATMULS
        matrix = site.node.target in m.MATMUL_OPERANDS and not (batched and _batched_on_fp32_units(val.device, config))
        gemm_kernel = matrix or conv and _conv_kernels(val.device)
        # the generated prologue kernels run on CUDA (fusion "auto" or "triton")
        fused = val.device.type == "cuda" and config.fusion is not Fusion.OFF
        elements = _conv_elements(site) if conv else None
        cost = site_cost(dims, specs, val.device, val.element_size(), gemm_kernel=gemm_kernel, fused=fused,
                         operand_elements=elements)
        if batched and isinstance(val.shape[0], int):
            # a batched GEMM's dims are one entry's: the whole batch costs that many times over
            cost = dataclasses.replace(cost, lowbit_s=cost.lowbit_s * val.shape[0], hp_s=cost.hp_s * val.shape[0])
        if not cost.wins:
            site.skip = (SkipKind.BY_COST, cost.reason())

    def _choose(self, site: Site, info: SiteInfo, ctx: PassContext) -> None:
        """Fill the site's specs: per GEMM, the first matching rule, else the recipe."""
        recipe = ctx.config.recipe
        decided: dict[GemmKind, Rule | None] = {}

        def spec(kind: GemmKind, role: TensorRole):
            if kind not in decided:
                decided[kind] = first_matching(ctx.config.rules, info, kind)
            rule = decided[kind]
            return rule.spec(kind, role, recipe) if rule is not None else recipe.spec(kind, role)

        site.fwd_specs = tuple(spec(GemmKind.OUTPUT, r) for r in site.roles)  # type: ignore[assignment]
        for bwd in site.backward:
            if bwd.skip is not None:
                continue
            bwd.grad_spec = spec(bwd.kind, TensorRole.GRAD_OUTPUT)
            fwd_spec = site.fwd_specs[bwd.fwd_operand]
            if bwd.kind in (GemmKind.GRAD_LHS, GemmKind.GRAD_RHS):
                rule = decided.get(bwd.kind)
                if rule is None:
                    want = _batched_backward_operand(recipe, bwd.kind, fwd_spec)
                else:  # a rule reuses the forward's codes, or keeps the operand in high precision
                    want = fwd_spec if rule.high_precision is None else None
            else:
                want = spec(bwd.kind, site.roles[bwd.fwd_operand])
            bwd.operand_spec = want
            if want is None:
                bwd.operand_source = OperandSource.HIGH_PRECISION
            elif want == fwd_spec:
                bwd.operand_source = OperandSource.REUSES_OUTPUT
            elif fwd_spec is None:
                bwd.operand_source = OperandSource.QUANTIZED
            else:
                bwd.operand_source = OperandSource.REQUANTIZED
        site.rules = decided

    def _decide(self, site: Site, ctx: PassContext) -> SiteDecision:
        gemms = []
        if site.skip is not None:
            kind, reason = site.skip
            self._maybe_raise(ctx, site, kind, reason)
            shape, flops = (_shape_and_flops(site.node, site) if (m.is_matmul(site.node) or m.is_conv(site.node))
                            else ("-", node_flops(site.node)))
            gemms.append(
                GemmDecision(GemmKind.OUTPUT, site.node.name, shape, flops, (), GemmStatus.SKIPPED, reason, kind, rule="-")
            )
            for bwd in site.backward:
                gemms.append(GemmDecision(bwd.kind, bwd.node.name, shape, flops, (), GemmStatus.SKIPPED, reason, kind, rule="-"))
            return SiteDecision(site.site_id, ctx.graph_id, site.module_path, site.op, site.rule, tuple(gemms))
        shape, flops = _shape_and_flops(site.node, site)
        fwd_ops = tuple(OperandDecision(r, s, _own_source(s)) for r, s in zip(site.roles, site.fwd_specs))
        gemms.append(self._gemm(GemmKind.OUTPUT, site.node.name, shape, flops, fwd_ops, ctx, site))
        for bwd in site.backward:
            if bwd.skip is not None:
                self._maybe_raise(ctx, site, *bwd.skip)
                gemms.append(GemmDecision(
                    bwd.kind, bwd.node.name, shape, flops, (), GemmStatus.SKIPPED, bwd.skip[1], bwd.skip[0], rule="-"
                ))
                continue
            ops = (
                OperandDecision(TensorRole.GRAD_OUTPUT, bwd.grad_spec, _own_source(bwd.grad_spec)),
                OperandDecision(site.roles[bwd.fwd_operand], bwd.operand_spec, bwd.operand_source),
            )
            gemms.append(self._gemm(bwd.kind, bwd.node.name, shape, flops, ops, ctx, site))
        return SiteDecision(site.site_id, ctx.graph_id, site.module_path, site.op, site.rule, tuple(gemms))

    def _gemm(self, kind, node, shape, flops, ops, ctx, site) -> GemmDecision:
        rule = site.rules.get(kind)
        by = f"rule {rule.name}" if rule is not None else f"recipe {ctx.config.recipe.name}"
        if all(o.spec is None for o in ops):
            if rule is not None and rule.high_precision is not None:
                return GemmDecision(
                    kind, node, shape, flops, ops, GemmStatus.SKIPPED, rule.high_precision, SkipKind.BY_RULE, rule=by
                )
            reason = f"{by} keeps {kind.value} in high precision"
            skip = SkipKind.BY_RULE if rule is not None else SkipKind.BY_RECIPE
            return GemmDecision(kind, node, shape, flops, ops, GemmStatus.SKIPPED, reason, skip, rule=by)
        return GemmDecision(kind, node, shape, flops, ops, GemmStatus.SIMULATED, rule=by)

    @staticmethod
    def _maybe_raise(ctx: PassContext, site: Site, kind: SkipKind, reason: str) -> None:
        if ctx.config.strict and kind is SkipKind.UNSUPPORTED:
            raise UnsupportedGraphError(
                f"GEMM site {site.site_id} ({site.op} at node {site.node.name}, module {site.module_path}) cannot be quantized: "
                f"{reason}. Pass strict=False to keep it in high precision with this reason recorded."
            )


def _batched_backward_operand(recipe, kind: GemmKind, fwd_spec: QuantSpec | None) -> QuantSpec | None:
    """The forward operand of an activation x activation GEMM (attention's ``bmm``) as its
    backward GEMM reads it. The paper's semantics reuse the forward codes; that is realizable
    unless they are scaled per row, which varies along both backward contractions (``grad_lhs``
    contracts the right operand's rows, ``grad_rhs`` the left operand's columns). Per-row codes
    are then re-quantized as the recipe re-quantizes a Linear's operand for the same GEMM
    (``grad_lhs``: grad_input's weight spec; ``grad_rhs``: grad_weight's activation spec), where
    that spec is realizable (per tensor or per channel); otherwise they are reused (simulated)."""
    if fwd_spec is None or fwd_spec.granularity is not Granularity.ROW:
        return fwd_spec
    group = recipe.grad_input if kind is GemmKind.GRAD_LHS else recipe.grad_weight
    analog = getattr(group, "weight" if kind is GemmKind.GRAD_LHS else "activation", None)
    if analog is None or analog.granularity not in (Granularity.TENSOR, Granularity.CHANNEL, Granularity.COLUMN):
        return fwd_spec
    return analog


def _batched_on_fp32_units(device: torch.device, config) -> bool:
    """Whether a batched GEMM's integer sums run as fp32 GEMMs of the codes, as fast as the
    fp32 GEMM (``cpu_gemm.qbmm_cpu``): on a CPU under Inductor, or where the int8 GEMM runs on
    fp32 units anyway."""
    return device.type == "cpu" and (config.inductor or int8_gemm_provider() != INT_MM)


def _conv_kernels(device: torch.device) -> bool:
    """Whether convolutions on ``device`` have low-bit kernels (CUDA: Triton; CPU: oneDNN)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return cpu_conv_problem() is None


def _conv_elements(site: Site) -> tuple[int, int, int] | None:
    """(activation, weight, grad_output) element counts of a convolution site (None: symbolic)."""
    x, w = (m.val_shape(a) for a in site.forward_operands)
    y = m.val_shape(site.node)
    sizes = [_product(*s) if s is not None else 0 for s in (x, w, y)]
    return tuple(sizes) if all(sizes) else None


def _own_source(spec: QuantSpec | None) -> OperandSource:
    """An operand quantized by its own quantizer, or left in high precision."""
    return OperandSource.QUANTIZED if spec is not None else OperandSource.HIGH_PRECISION
