"""Several evaluations of one network in one process: ``evaluate many --each "fid ..." --each "dfid ..."``.

Each ``--each`` is the argument list of one ``evaluate fid | dfid | grid`` command, exactly as its own job would
run it (``--out``, ``--run-key`` and all): it is parsed by the same parser and run by the same function, in
turn, so its output file and its MLflow child run are the ones of the separate command. What is shared is the
process: torch, MLflow and the feature network's code are loaded once instead of once per evaluation (about
4 s of start-up each on a CPU, most of an evaluation job on the ``ci`` and ``tiny`` presets). The workflow runs
a main network's FIDs, grids and dFID sweeps this way (``rule evaluate_network``).

MLflow tags: the ``TCM_MLFLOW_TAGS`` of the job (preset, study, grid, target run) hold for every evaluation;
each adds its own ``tcm.run_key`` (its ``--run-key``) and ``tcm.rule`` (the key's first field, the rule that
would run it alone), as the workflow tags a separate evaluation job.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex

from tcm_core.errors import ConfigError

KINDS = ("fid", "dfid", "grid")  # the evaluate commands that ``many`` runs


def add_arguments(sub: argparse._SubParsersAction) -> None:
    many = sub.add_parser("many", help="several evaluate fid|dfid|grid commands of one network in one process")
    many.add_argument("--each", action="append", required=True, metavar="'KIND ARGS'",
                      help=f"one evaluation: {' | '.join(KINDS)} and its arguments, as one (quoted) string")


def _each_parser(text: str) -> argparse.ArgumentParser:
    """An ``evaluate`` parser for one ``--each`` string: a bad argument is one ConfigError line naming the string
    (its subcommands' parsers are of the same class)."""

    class EachParser(argparse.ArgumentParser):
        def error(self, message: str):
            raise ConfigError(f"{message} in {text!r}", "--each", "give the arguments its evaluate command takes")

    return EachParser(prog="evaluate")


def parse_each(text: str) -> argparse.Namespace:
    """The namespace of one ``--each`` string, parsed by the ``evaluate`` parser itself."""
    from tcm_core.evaluation.commands import add_evaluate_arguments

    try:
        words = shlex.split(text)
    except ValueError as error:  # an unclosed quote
        raise ConfigError(f"{error} in {text!r}", "--each", "quote it as a shell would") from None
    if not words or words[0] not in KINDS:
        raise ConfigError(f"not an evaluation: {text!r}", "--each", f"start it with one of {', '.join(KINDS)}")
    parser = _each_parser(text)
    add_evaluate_arguments(parser)
    args = parser.parse_args(words)
    if not args.run_key and args.mlflow_uri:
        raise ConfigError(f"an MLflow-tracked evaluation needs its own --run-key: {text!r}", "--each",
                          "give each evaluation the --run-key of its separate job")
    return args


def run_many(args: argparse.Namespace) -> int:
    from tcm_core.evaluation.commands import run_evaluate
    from tcm_core.tracking.tracker import ENV_ARTIFACTS, ENV_TAGS

    evaluations = [parse_each(text) for text in args.each]  # all checked before the first one runs
    job_tags, job_artifacts = os.environ.get(ENV_TAGS), os.environ.pop(ENV_ARTIFACTS, None)
    common = json.loads(job_tags or "{}")
    try:
        for each in evaluations:
            tags = dict(common)
            if each.run_key:
                tags |= {"tcm.run_key": each.run_key, "tcm.rule": each.run_key.split(":", 1)[0]}
            os.environ[ENV_TAGS] = json.dumps(tags, sort_keys=True)
            code = run_evaluate(each)
            if code:
                return code
    finally:
        _restore(ENV_TAGS, job_tags)
        _restore(ENV_ARTIFACTS, job_artifacts)
    return 0


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
