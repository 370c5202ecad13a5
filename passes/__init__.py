"""FX passes over the AOTAutograd joint graph (see README.md in this folder).

The passes are steps of the one pipeline, ``fqt_compiler.pipeline``, which lists and runs them
in order with every other transformation.
"""

from fqt_compiler.passes.base import FQTPass, PassContext
from fqt_compiler.passes.dedupe import Dedupe
from fqt_compiler.passes.find_sites import FindSites
from fqt_compiler.passes.insert_qdq import InsertQDQ
from fqt_compiler.passes.select_specs import SelectSpecs

__all__ = ["PassContext", "FQTPass", "FindSites", "SelectSpecs", "InsertQDQ", "Dedupe"]
