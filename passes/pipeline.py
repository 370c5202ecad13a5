"""THE ordered list of fqt passes over a joint (or inference) graph, and the driver.

    find_sites -> select_specs -> insert_qdq -> dedupe      (verify after each in debug mode)

Each pass runs under an observer that records its name and, in debug mode, the graph text
after it. A failing pass is re-raised with the list of passes that already ran.
"""

from __future__ import annotations

import logging

from torch import fx

from fqt_compiler.dump import graph_dot, graph_text, runnable_source
from fqt_compiler.errors import FQTError, PassError

from .base import FQTPass, PassContext
from .dedupe import Dedupe
from .find_sites import FindSites
from .insert_qdq import InsertQDQ
from .select_specs import SelectSpecs
from .verify import verify_graph

log = logging.getLogger("fqt_compiler.passes")

PIPELINE: tuple[type[FQTPass], ...] = (FindSites, SelectSpecs, InsertQDQ, Dedupe)


def _capture(gm: fx.GraphModule, ctx: PassContext, stage: str) -> None:
    """Keep the graph after ``stage`` as text and as a runnable script (debug mode)."""
    text = graph_text(gm)
    ctx.graph_texts.append((stage, text))
    ctx.stages.append((stage, text, runnable_source(gm, f"fqt graph {ctx.graph_id}, after {stage}", f"{stage}.py")))


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Run every pass of :data:`PIPELINE` on ``gm`` in place; fills ``ctx``."""
    debug = ctx.config.debug
    if debug:
        _capture(gm, ctx, "input")
    for pass_cls in PIPELINE:
        p = pass_cls()
        missing = [r for r in p.requires if r not in ctx.ran]
        if missing:
            raise PassError(f"pass {p.name!r} requires {missing} to run first (ran: {ctx.ran})")
        try:
            p.run(gm, ctx)
            if debug and p.mutates:
                verify_graph(gm, p.name)
        except FQTError:
            raise
        except Exception as exc:
            raise PassError(f"fqt pass {p.name!r} failed after passes {ctx.ran}: {type(exc).__name__}: {exc}") from exc
        ctx.ran.append(p.name)
        log.debug("pass %s done on graph %d (%d nodes)", p.name, ctx.graph_id, len(gm.graph.nodes))
        if debug:
            _capture(gm, ctx, p.name)
    verify_graph(gm, "pipeline")
    if debug:
        ctx.dot = graph_dot(gm, f"fqt graph {ctx.graph_id} ({ctx.config.recipe.name}), after the passes")
    return gm
