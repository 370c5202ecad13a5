"""``python -m fqt_compiler ...``: the ``fqt`` command line, run by the interpreter that holds
the package -- for machines where ``pip`` installed the ``fqt`` script into a folder that is
not on the ``PATH``, or where ``pip`` on the ``PATH`` belongs to another Python."""

import sys

from fqt_compiler.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
