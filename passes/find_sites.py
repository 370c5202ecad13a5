"""Analysis pass: find every GEMM site in the joint graph and pair forward with backward GEMMs.

Forward GEMMs are ``mm``/``addmm``/``bmm``/``baddbmm``/``convolution`` nodes outside the
backward. A backward GEMM belongs to the forward GEMM with the same ``meta["seq_nr"]`` and
consumes one forward operand (reached through view ops: ``t``, ``transpose``, ``view``, ...)
and ``grad_output``. Which forward operand it consumes tells which gradient it computes: the
GEMM consuming the weight computes ``grad_input``, the one consuming the activation computes
``grad_weight`` (``grad_lhs`` / ``grad_rhs`` when both operands are activations).

Layouts (see ``fqt_compiler.layout.Layout``): a forward lhs is consumed in its natural layout
(``PENULTIMATE``), a forward rhs as the transpose of it (``LAST``, so a Linear weight's rows are
its out channels); every transpose on the way into a backward GEMM flips that. ``grad_output``'s
natural rows are the output rows: they are the contracted dim of the GEMM computing the rhs
gradient and the outer dim of the GEMM computing the lhs gradient. Convolutions use ``DIM0``
(rows = samples / out channels, the paper's ``view(N, -1)``).

Never mutates the graph.
"""

from __future__ import annotations

from torch import fx

from fqt_compiler.layout import Layout
from fqt_compiler.flops import is_contraction
from fqt_compiler.sites import SkipKind
from fqt_compiler.specs import GemmKind, TensorRole

from fqt_compiler.passes.graph_utils import arg as call_arg
from fqt_compiler.passes import matchers as m
from fqt_compiler.passes.base import BackwardGemm, FQTPass, PassContext, Site


def _placeholder_index(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}


def _param_derived(gm: fx.GraphModule, ctx: PassContext, ph: dict[fx.Node, int]) -> set[fx.Node]:
    """The forward nodes computed from parameters alone: a weight is such an operand.

    Besides a parameter seen through views and casts, that covers the weights users compute
    from parameters: weight normalization (``g * v / ||v||``), weight standardization, spectral
    normalization's ``W / sigma``, a frozen base plus a low-rank update, DropConnect. Anything
    that also reads a model input (or a gradient) is an activation.
    """
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if ph.get(node) in ctx.param_indices:
                derived.add(node)
        elif node.op == "get_attr":
            derived.add(node)  # a constant lifted into the graph: batch-independent, like a weight
        elif node.op == "call_function" and not m.is_backward_node(node):
            inputs = node.all_input_nodes
            if inputs and all(x in derived for x in inputs):
                derived.add(node)
    return derived


def _backward_kind(roles: tuple[TensorRole, TensorRole], consumed: int) -> GemmKind:
    other = 1 - consumed  # the gradient computed is the other operand's
    if roles[consumed] is TensorRole.WEIGHT and roles[other] is TensorRole.ACTIVATION:
        return GemmKind.GRAD_INPUT
    if roles[consumed] is TensorRole.ACTIVATION and roles[other] is TensorRole.WEIGHT:
        return GemmKind.GRAD_WEIGHT
    return GemmKind.GRAD_LHS if other == 0 else GemmKind.GRAD_RHS


class FindSites(FQTPass):
    name = "find_sites"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        ph = _placeholder_index(gm)
        weights = _param_derived(gm, ctx, ph)
        by_seq: dict[object, Site] = {}
        # backward nodes carry no module stack: they take their forward op's (same seq_nr)
        forward_paths: dict[object, str] = {}
        backward_gemms: list[fx.Node] = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            path = m.module_path(node)
            if path != "-" and not m.is_backward_node(node):
                forward_paths.setdefault(node.meta.get("seq_nr"), path)
            elif path == "-" and m.is_backward_node(node):
                path = forward_paths.get(node.meta.get("seq_nr"), "-")
            if not (m.is_matmul(node) or m.is_conv(node) or node.target is m.CONV_BACKWARD):
                # every other op FlopCounterMode counts is a row with its reason, never dropped
                reason = self._unmatched_reason(node)
                if reason is not None:
                    ctx.sites.append(Site(len(ctx.sites), node, m.op_name(node), path, skip=(SkipKind.UNSUPPORTED, reason)))
                continue
            if m.is_backward_node(node) or node.target is m.CONV_BACKWARD:
                backward_gemms.append(node)
                continue
            site = self._forward_site(node, len(ctx.sites), weights)
            ctx.sites.append(site)
            seq = node.meta.get("seq_nr")
            if seq is not None:
                by_seq.setdefault(seq, site)
        for node in backward_gemms:
            site = by_seq.get(node.meta.get("seq_nr"))
            if site is None or site.skip is not None:
                why = ("backward GEMM with no forward GEMM to pair with (seq_nr)" if site is None
                       else f"backward of a skipped GEMM: {site.skip[1]}")
                path = forward_paths.get(node.meta.get("seq_nr"), "-") if site is None else site.module_path
                ctx.sites.append(Site(len(ctx.sites), node, m.op_name(node), path, skip=(SkipKind.UNSUPPORTED, why)))
                continue
            self._attach_backward(site, node)

    @staticmethod
    def _unmatched_reason(node: fx.Node) -> str | None:
        """Why a GEMM-like node that is no matmul / convolution site stays in high precision
        (None: not GEMM-like)."""
        if node.target in m.UNSUPPORTED_GEMMS:
            reason = m.UNSUPPORTED_GEMMS[node.target]
        elif is_contraction(node):
            reason = f"no fqt matcher for {m.op_name(node)}: its FLOPs run in high precision"
        else:
            return None
        return f"{reason} (backward)" if m.is_backward_node(node) else reason

    def _forward_site(self, node: fx.Node, site_id: int, weights: set[fx.Node]) -> Site:
        site = Site(site_id, node, m.op_name(node), m.module_path(node))
        val = node.meta.get("val")
        if val is None or not val.is_floating_point():
            site.skip = (SkipKind.UNSUPPORTED, f"non-floating-point GEMM ({getattr(val, 'dtype', 'unknown dtype')})")
            return site
        site.operand_args = (0, 1) if m.is_conv(node) else m.MATMUL_OPERANDS[node.target]
        dtypes = [getattr(x.meta.get("val"), "dtype", None) if isinstance(x, fx.Node) else None for x in site.forward_operands]
        if len(set(dtypes)) != 1 or not all(d is not None and d.is_floating_point for d in dtypes):
            # fake kernels type-promote mixed operands (int64 x float32 -> float32) where the
            # real GEMM raises; quantizing would hide eager's dtype error behind finite numbers
            site.skip = (SkipKind.UNSUPPORTED, f"operands of dtypes {' x '.join(str(d) for d in dtypes)}: left as traced "
                                               "(raises as in eager)")
            return site
        if m.is_conv(node):
            site.roles = (TensorRole.ACTIVATION, TensorRole.WEIGHT)
            site.layouts = (Layout.DIM0, Layout.DIM0)
            return site
        lhs, rhs = site.forward_operands
        roles = [TensorRole.WEIGHT if x in weights else TensorRole.ACTIVATION for x in (lhs, rhs)]
        site.roles = (roles[0], roles[1])
        site.layouts = (Layout.PENULTIMATE, Layout.LAST)
        return site

    def _attach_backward(self, site: Site, node: fx.Node) -> None:
        if node.target is m.CONV_BACKWARD:
            self._attach_conv_backward(site, node)
            return
        fwd = site.forward_operands
        targets = set(fwd)
        for pos in (0, 1):
            arg_idx = m.MATMUL_OPERANDS[node.target][pos]
            found = m.trace_to(node.args[arg_idx], targets)
            if found is None:
                continue
            reached, chain, swaps = found
            consumed = fwd.index(reached)
            other_pos = 1 - pos
            kind = _backward_kind(site.roles, consumed)
            # grad_output's natural rows are the forward output's rows: the outer dim when this
            # GEMM computes the lhs gradient (it consumes the rhs), the contracted dim otherwise.
            rows_outer = consumed == 1
            grad_is_lhs = other_pos == 0
            grad_layout = Layout.PENULTIMATE if rows_outer == grad_is_lhs else Layout.LAST
            site.backward.append(
                BackwardGemm(
                    node=node,
                    kind=kind,
                    fwd_operand=consumed,
                    fwd_arg=arg_idx,
                    grad_arg=m.MATMUL_OPERANDS[node.target][other_pos],
                    chain=chain,
                    fwd_layout=m.flip(site.layouts[consumed], swaps),
                    grad_layout=grad_layout,
                )
            )
            return
        site.backward.append(
            BackwardGemm(
                node=node, kind=GemmKind.GRAD_INPUT, fwd_operand=-1, fwd_arg=-1, grad_arg=-1, chain=[],
                fwd_layout=Layout.DIM0, grad_layout=Layout.DIM0,
                skip=(SkipKind.UNSUPPORTED, "backward GEMM operands do not trace back to the forward operands through view ops"),
            )
        )

    def _attach_conv_backward(self, site: Site, node: fx.Node) -> None:
        mask = list(call_arg(node, "output_mask"))
        fwd = site.forward_operands
        # convolution_backward(grad_output, input, weight, ...): arg 1 is the activation, 2 the weight
        for out_idx, (kind, consumed, arg) in enumerate(((GemmKind.GRAD_INPUT, 1, 2), (GemmKind.GRAD_WEIGHT, 0, 1))):
            if not mask[out_idx]:
                continue
            found = m.trace_to(node.args[arg], {fwd[consumed]})
            bwd = BackwardGemm(
                node=node, kind=kind, fwd_operand=consumed, fwd_arg=arg, grad_arg=0,
                chain=found[1] if found else [], fwd_layout=Layout.DIM0, grad_layout=Layout.DIM0, conv_output=out_idx,
            )
            if found is None:
                bwd.skip = (SkipKind.UNSUPPORTED, "convolution_backward operand does not trace back to the forward operand")
            site.backward.append(bwd)
