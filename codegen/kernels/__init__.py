"""Triton kernels. Each module has private ``_<op>_kernel`` functions and a public launcher
``<op>`` whose reference twin (same signature) lives in ``fqt_compiler.reference``."""
