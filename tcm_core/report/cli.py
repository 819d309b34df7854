"""``python -m tcm_core tables``: read the results of a preset and write its tables, figures and claims check."""

from __future__ import annotations

import argparse
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

from tcm_core.errors import ConfigError
from tcm_core.io.atomic import write_bytes_atomic
from tcm_core.report.claims import Claim, claims, claims_table, split_line
from tcm_core.report.figures import FIGURE_BUILDERS, FIGURES
from tcm_core.report.merge import CROSSCHECK_COLUMNS, collect
from tcm_core.report.mid_t_sweep import sweep_table
from tcm_core.report.paper import PaperRow, load_paper_values
from tcm_core.report.results import Results
from tcm_core.report.tables import TABLES, table1, table2, table3, table4, table5, table6


def output_files(out_dir: str | Path) -> dict[str, list[str]]:
    """The files ``tables`` writes under ``out_dir`` (the Snakemake rule declares exactly these)."""
    out = Path(out_dir)
    tables = [str(out / "tables" / f"{name}.{ext}") for name in TABLES for ext in ("md", "csv")]
    tables.append(str(out / "tables" / "crosscheck.csv"))
    figures = [str(out / "figures" / f"{name}.png") for name in FIGURES]
    return {"tables": tables, "figures": figures}


@dataclass
class Report:
    files: list[Path]
    empty_figures: list[str]
    claims: list[Claim]
    results: Results
    timings: dict[str, float]


def build_report(
    preset: str,
    results_dir: str | Path,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    paper_values: Path | None = None,
    figures: bool = True,
    training_seeds: int | None = None,
) -> Report:
    """Read every result of ``preset`` and write the tables, figures and claims under ``out_dir``; with
    ``training_seeds`` K, of training seeds 0 .. K-1 only."""
    results, timings = collect(Path(results_dir), preset, tracking_uri)
    if training_seeds is not None:
        results = results.first_seeds(training_seeds)
    out = Path(out_dir)
    paper = load_paper_values(paper_values)

    start = time.perf_counter()
    checked = claims(results)
    files = _write_tables(results, paper, checked, out / "tables")
    timings["tables and claims"] = time.perf_counter() - start

    start = time.perf_counter()
    empty = []
    for name, builder in FIGURE_BUILDERS.items() if figures else ():
        path = out / "figures" / f"{name}.png"
        if not builder(results, path):
            empty.append(name)
        files.append(path)
    timings["figures"] = time.perf_counter() - start
    return Report(files, empty, checked, results, timings)


def _write_tables(results: Results, paper: list[PaperRow], checked: list[Claim], folder: Path) -> list[Path]:
    """Tables 1-6 and the claims table (Markdown and CSV), then the files-vs-MLflow cross-check."""
    files = []
    tables = [
        table1(results, paper),
        table2(results, paper),
        table3(results, paper),
        table4(results, paper),
        table5(results, paper),
        table6(results, paper),
        sweep_table(results),
        claims_table(results, checked),
    ]
    for table in tables:
        for ext, text in (("md", table.markdown()), ("csv", table.csv_text())):
            path = folder / f"{table.name}.{ext}"
            write_bytes_atomic(path, text.encode())
            files.append(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CROSSCHECK_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results.crosscheck)
    path = folder / "crosscheck.csv"
    write_bytes_atomic(path, buffer.getvalue().encode())
    files.append(path)
    return files


def format_summary(report: Report, seconds: float) -> str:
    """What was read, what differs between files and MLflow, the claims, every file written, and timing."""
    results = report.results
    lines = [f"tables: preset {results.preset}", _runs_line(results)]
    lines += [f"  note: {n}" for n in results.notes]
    mismatches = [c for c in results.crosscheck if not c["agree"]]
    lines.append(f"  cross-check files vs MLflow: {len(results.crosscheck)} values compared, {len(mismatches)} differ")
    lines += [
        f"    differs: {c['run']} {c['metric']} step {c['step']}: files {c['files']} vs mlflow {c['mlflow']}"
        for c in mismatches[:10]
    ]
    lines.append("  claims:")
    lines.append(f"    {split_line(results)}")
    lines += [f"    {c.cid} {c.verdict} ({c.seeds} seed(s)): {c.interval}; MDE {c.mde}; {c.measured}"
              for c in report.claims]
    lines.append("  files:")
    for path in report.files:
        flag = "  (no runs yet)" if path.stem in report.empty_figures else ""
        lines.append(f"    {path}  {path.stat().st_size:,} B{flag}")
    if report.empty_figures:
        lines.append(f"  figures with no data yet: {', '.join(report.empty_figures)}")
    lines.append(
        "  timing: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items()) + f"; total {seconds:.1f} s"
    )
    return "\n".join(lines)


def _runs_line(results: Results) -> str:
    by_source: dict[str, int] = {}
    for run in results.runs:
        for source in run.sources:
            by_source[source] = by_source.get(source, 0) + 1
    return (
        f"  runs found: {len(results.runs)} training runs "
        f"({', '.join(f'{n} with {s}' for s, n in sorted(by_source.items())) or 'none'}), "
        f"{len(results.evaluations)} evaluations"
    )


def add_tables_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="preset whose runs are reported (tag tcm.preset)")
    parser.add_argument("--results", required=True, type=Path, help="results folder of the preset (results/P)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (sqlite:///abs/path or http://host:port); 'none' to skip MLflow",
    )
    parser.add_argument("--out", required=True, type=Path, help="writes OUT/tables/*.md|csv and OUT/figures/*.png")
    parser.add_argument("--mlflow-parent", type=Path, default=None,
                        help="mlflow.json of the study: the tables and figures become artifacts of its parent run")
    parser.add_argument("--paper-values", type=Path, default=None, help="override of tcm_core/report/paper_values.csv")
    parser.add_argument("--no-figures", action="store_true", help="write the tables and claims only (quick look)")
    parser.add_argument("--training-seeds", type=int, default=None, metavar="K",
                        help="report training seeds 0 .. K-1 of each arm (the target's K); default: every seed found")


def run_tables(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.training_seeds is not None and args.training_seeds < 1:
        raise ConfigError(f"tables: --training-seeds {args.training_seeds}: give K >= 1 (the target's training_seeds)")
    report = build_report(args.preset, args.results, args.out, args.tracking_uri, args.paper_values,
                          figures=not args.no_figures, training_seeds=args.training_seeds)
    print(format_summary(report, time.perf_counter() - start), flush=True)
    if args.mlflow_parent and args.tracking_uri and args.tracking_uri.lower() != "none":
        from tcm_core.tracking.mlflow_store import log_on_parent

        parent = log_on_parent(args.tracking_uri, args.mlflow_parent, report.files, root=args.results)
        print(f"  MLflow: {len(report.files)} files logged as artifacts of the study's parent run {parent}", flush=True)
    return 0
