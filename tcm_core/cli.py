"""Command-line entry point: ``python -m tcm_core <command> ...``.

Each command lives in the module that owns its concept. That module exposes two functions,
``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``; they are imported lazily so
that ``--help`` and light commands do not pay for importing torch, clean-fid or MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tcm_core.errors import as_expected

# command -> (module, function suffix, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("tcm_core.training.loop", "train",
              "train a network: pretrain, stage1, stage1_continued, intermediate, stage2, stage3"),
    "fetch": ("tcm_core.io.downloads", "fetch", "download a checkpoint with resume and sha256 verification"),
    "inspect": ("tcm_core.io.network_files", "inspect", "print format, architecture and sha256 of a checkpoint"),
    "prepare-dataset": ("tcm_core.data", "prepare_dataset", "build a dataset in EDM layout (mnist5k, cifar10)"),
    "train-feature-net": ("tcm_core.evaluation.features", "train_feature_net", "train the LeNet FID feature network"),
    "reference-stats": ("tcm_core.evaluation.commands", "reference_stats", "compute FID reference statistics"),
    "evaluate": ("tcm_core.evaluation.commands", "evaluate", "FID, dFID sweeps and sample grids"),
    "mlflow-init": ("tcm_core.tracking.mlflow_store", "mlflow_init",
                    "create the MLflow experiment and study parent run"),
    "tables": ("tcm_core.report.cli", "tables", "build the paper tables, figures and claims check"),
    "release-check": ("tcm_core.releases", "release_check",
                      "find a released checkpoint, pin its sha256 at first use, read it without running code"),
    "released-tables": ("tcm_core.report.released", "released_tables",
                        "the released checkpoints' FIDs beside the paper's (Tables 1 and 2)"),
    "gpu-check": ("tcm_core.gpu.check", "gpucheck", "check every CUDA path on synthetic data (--dry-run on CPU)"),
    "bench": ("tcm_core.gpu.bench", "bench", "Stage-2 / Stage-1 step cost and training iterations per mode"),
    "check-config": ("tcm_core.presets", "check_config", "check config.yaml and --configfile overlays (file, line)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tcm_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, suffix, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (and so only its arguments are known).
        if name == wanted:
            module = importlib.import_module(module_name)
            getattr(module, f"add_{suffix}_arguments")(p)
            p.set_defaults(_run=getattr(module, f"run_{suffix}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (tcm_core.errors) print one line and return their exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Exception as error:
        expected = as_expected(error)
        if expected is None:
            raise  # a bug: keep the traceback
        print(expected.line(), file=sys.stderr)
        return expected.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
