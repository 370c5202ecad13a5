"""The ``fqt`` command line: ``fqt demo``, ``fqt inspect``, ``fqt variance``, ``fqt results``, ``fqt bench``,
``fqt gpu-check``, ``fqt monitor``.

Each subcommand imports what it runs (torch, the package, matplotlib, scikit-learn) inside its
handler: ``fqt --help`` and argument errors answer at once, and one subcommand's optional
dependency never breaks another.
"""

from __future__ import annotations

import argparse
import sys

from fqt_compiler.tools.gpu_check import add_parser as add_gpu_check


def _demo(args: argparse.Namespace) -> int:
    from fqt_compiler.tools.demo import main

    main(
        recipes=args.recipes, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, var_draws=args.var_draws,
        mode=args.mode,
    )
    return 0


def load_factory(spec: str):
    """``path/to/script.py:factory`` -> (model, example inputs); errors name what is wrong."""
    from fqt_compiler.errors import OptionsError

    made = _load_callable(spec)()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], (tuple, list))):
        raise OptionsError(f"{spec!r}: the factory must return (model, example_inputs), example_inputs a tuple")
    return made[0], tuple(made[1])


def _load_callable(spec: str):
    """The function ``path/to/script.py:name``."""
    import importlib.util
    from pathlib import Path

    from fqt_compiler.errors import OptionsError

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise OptionsError(f"{spec!r}: give the model factory as path/to/script.py:function")
    file = Path(path)
    if not file.is_file():
        raise OptionsError(f"{spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"fqt_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # Dynamo looks traced code's module up by name
    module_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise OptionsError(f"{spec!r}: {file.name} has no function {name!r}")
    return factory


def _inspect(args: argparse.Namespace) -> int:
    import fqt_compiler as fqt

    model, inputs = load_factory(args.factory)
    options = {"execution": args.mode}
    if args.mode == "kernels":
        options["inductor"] = args.inductor
        options["fusion"] = args.fusion
        options["never_slower"] = args.never_slower
    report = fqt.explain(model, *inputs, recipe=args.recipe, **options)
    print(report.render(wide=args.wide))
    if not args.wide:  # the wide report has it already
        print(f"\nlaunches per call of each compiled graph:\n{report.launch_table()}")
    for line in report.write(args.out):
        print(line)
    return 0


def _variance(args: argparse.Namespace) -> int:
    from fqt_compiler.tools.variance import main

    print(main(
        _variance_factory(args.factory), recipe=args.recipe, draws=args.draws, alpha=args.alpha, out=args.out,
        sweep=not args.no_sweep,
    ))
    return 0


def _variance_factory(spec: str | None):
    """None (the demo model), or a loader of ``path/to/script.py:function`` checked to return
    ``(model, loss_fn, batches)``."""
    if spec is None:
        return None

    def factory():
        from fqt_compiler.errors import OptionsError

        made = _load_callable(spec)()
        if not (isinstance(made, tuple) and len(made) == 3):
            raise OptionsError(f"{spec!r}: a variance factory returns (model, loss_fn, batches)")
        return made

    return factory


def _results(args: argparse.Namespace) -> int:
    from fqt_compiler.tools.results import main

    print(main(out_dir=args.out, steps=args.steps, epochs=args.epochs, recipes=args.recipes, execution=args.execution))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fqt_compiler.tools.bench import run

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else None
    text = run(args.sections, args.device, args.reps, args.recipes, shapes)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from fqt_compiler.tools.monitor_log import render

    print(render(args.log, plot=args.plot, site=args.site))
    return 0


def _add_monitor(sub) -> None:
    """``fqt monitor LOG``: reads a log; imports nothing of torch's compile stack."""
    mon = sub.add_parser("monitor", help="per-site table, alerts and plots of a numerics-monitor log (JSON lines)",
                         description="Render the log an fqt.Monitor wrote (docs/monitor.md).")
    mon.add_argument("log", help="the JSON-lines log (Monitor(sinks=['log.jsonl']))")
    mon.add_argument("--plot", default=None, help="also write forward error / variance ratio curves to this image (matplotlib)")
    mon.add_argument("--site", default=None, help="list one site's records step by step (graph.site, as in the table)")
    mon.set_defaults(func=_monitor)


def build_parser() -> argparse.ArgumentParser:
    """The ``fqt`` parser: one subcommand per tool."""
    parser = argparse.ArgumentParser(prog="fqt", description="fqt: fully quantized training as a torch.compile backend")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_inspect(sub)
    _add_variance(sub)
    _add_results(sub)
    _add_bench(sub)
    add_gpu_check(sub)
    _add_calibrate(sub)
    _add_monitor(sub)
    return parser


def _add_calibrate(sub) -> None:
    """``fqt calibrate``: the tool imports torch's compile stack, so only when it runs."""
    cal = sub.add_parser("calibrate", help="measure this CPU's cost-model profile (never_slower) and save it",
                         description="Measure this CPU's GEMM throughputs and quantize bandwidth and save them as the "
                         "cost model's profile for this CPU and thread count.")
    cal.add_argument("--size", type=int, default=2048, help="square GEMM size timed (default: 2048)")
    cal.add_argument("--reps", type=int, default=7, help="timed repetitions, median reported (default: 7)")
    cal.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from fqt_compiler.tools.calibrate import main as calibrate

    return calibrate(args)


def _add_demo(sub) -> None:
    """``fqt demo`` and its options."""
    demo = sub.add_parser("demo", help="train a small CNN on the digits data under the paper's recipes and compare")
    demo.add_argument(
        "--recipes", nargs="+", default=None, help="recipes to run (default: exact qat ptq8 psq8 bhq8 ptq4 psq4 bhq4)"
    )
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--var-draws", type=int, default=16, help="backward passes used to measure gradient variance")
    demo.add_argument("--mode", default="reference", choices=["reference", "kernels"], help="execution mode (default: reference)")
    demo.set_defaults(func=_demo)


def _add_inspect(sub) -> None:
    """``fqt inspect`` and its options."""
    inspect = sub.add_parser("inspect", help="compile a model, print its GEMM decision table, write the full report")
    inspect.add_argument("factory", help="path/to/script.py:function returning (model, example_inputs)")
    inspect.add_argument("--recipe", default="int8", help="recipe name (default: int8)")
    inspect.add_argument("--mode", default="kernels", choices=["kernels", "reference"], help="execution (default: kernels)")
    inspect.add_argument("--inductor", action="store_true", help="kernels mode: also compile with Inductor (slow)")
    inspect.add_argument(
        "--fusion", default="auto", choices=["auto", "off", "triton"],
        help="kernels mode: generated fused kernels (auto: on CUDA; triton: everywhere, CPU needs TRITON_INTERPRET=1)",
    )
    inspect.add_argument(
        "--never-slower", action="store_true", help="kernels mode: keep sites the cost model says cannot win in high precision"
    )
    inspect.add_argument("--out", default="fqt_report", help="folder for the report (default: fqt_report)")
    inspect.add_argument("--wide", action="store_true", help="every column (operand specs, rules), not fitted to 120 columns")
    inspect.set_defaults(func=_inspect)


def _add_variance(sub) -> None:
    """``fqt variance`` and its options."""
    var = sub.add_parser("variance", help="bias and variance quantization adds to the gradient, per layer; bit-width advice")
    var.add_argument(
        "factory", nargs="?", default=None,
        help="path/to/script.py:function returning (model, loss_fn, batches); default: the demo CNN",
    )
    var.add_argument("--recipe", default="psq4")
    var.add_argument("--draws", type=int, default=32,
                     help="backward passes per Monte-Carlo estimate (the bits sweep and the advice: at most 16)")
    var.add_argument(
        "--alpha", type=float, default=0.1, help="advisor: quantization variance budget as a fraction of the sampling variance"
    )
    var.add_argument("--out", default=None, help="folder for the PNG plots (needs matplotlib)")
    var.add_argument("--no-sweep", action="store_true", help="skip the bits sweep (and the plots)")
    var.set_defaults(func=_variance)


def _add_results(sub) -> None:
    """``fqt results`` and its options."""
    res = sub.add_parser("results", help="train a byte-level GPT and the demo CNN under every recipe; table and loss curves")
    res.add_argument("--out", default="docs", help="folder for results_lm.png and results_cnn.png")
    res.add_argument("--steps", type=int, default=300)
    res.add_argument("--epochs", type=int, default=3)
    res.add_argument("--recipes", nargs="+", default=None)
    res.add_argument("--execution", choices=["kernels", "reference"], default="kernels",
                     help="kernels: low-bit kernels, so ms/step is fqt's (default); reference: everything simulated")
    res.set_defaults(func=_results)


def _add_bench(sub) -> None:
    """``fqt bench`` and its options."""
    bench = sub.add_parser(
        "bench", help="benchmarks: ratios against a high-precision torch.compile baseline timed in the same run",
        description="Every number is a ratio against a baseline timed beside it (interleaved repetitions, median); "
        "the protocol and the recorded results are in docs/benchmarks.md.",
    )
    bench.add_argument(
        "--sections", nargs="+", default=["layer", "fusion", "gemm", "quantize", "memory"],
        choices=["layer", "fusion", "gemm", "quantize", "memory", "conv", "attention", "monitor", "compile"],
        help="layer: LayerNorm-Linear-Sigmoid fwd+bwd; fusion: MLP block fused vs unfused; gemm: the low-bit GEMM alone; "
        "quantize: quantizer bandwidth vs a copy; memory: bytes saved for backward; conv: convolution layers and CIFAR "
        "ResNet training steps; attention: the attention core's batched GEMMs fwd+bwd (its own shapes); monitor: the "
        "cost of fqt.Monitor at period 100; compile: a small GPT's first training step compiled with cold caches, Inductor "
        "against fqt (default: all but conv, attention, monitor and compile, which take minutes on a CPU)",
    )
    bench.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda if available)")
    bench.add_argument(
        "--reps", type=int, default=7, help="interleaved timed repetitions per measurement; the median is reported (default: 7)"
    )
    bench.add_argument("--recipes", nargs="+", default=["int8"], help="recipes to benchmark (default: int8)")
    bench.add_argument(
        "--shapes", nargs="+", default=None, help="MxKxN shapes (default: the device's list in docs/benchmarks.md)"
    )
    bench.add_argument("--output", default=None, help="also write the markdown here")
    bench.set_defaults(func=_bench)

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # a user-facing error: show it without a traceback wall
        from fqt_compiler.errors import FQTError

        if isinstance(exc, FQTError):
            print(f"fqt: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
