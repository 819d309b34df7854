"""``released_tables``: the released checkpoints' FIDs and dFIDs beside the paper's values (Tables 1 and 2 rows).

    python -m tcm_core released-tables --preset P --releases results/P/releases/<key> ... \
        --ref-stats results/P/data/ref_stats_inception.npz --out results/P/tables/released.md

Each release folder holds ``release.json`` (``release-check``: the role, paper row, steps, middle time, the file and
its pinned sha256) and ``eval/fid_<n>step.json`` / ``eval/dfid.json`` (``evaluate fid|dfid``). A row is one NFE
of one release: the paper's value (``paper_values.csv`` key ``<paper_row>_<NFE>``), ours (the minimum over the
seed sets), the difference and "matches" (within :data:`MATCH_TOLERANCE_FID`), shown only where our metric is
the paper's (Inception, 50k samples, the same data set); dFID_t rows have no paper value (the paper draws them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tcm_core.errors import MissingFileError
from tcm_core.io.atomic import write_bytes_atomic
from tcm_core.report.paper import PAPER_METRIC, PAPER_SETUP, PaperRow, load_paper_values
from tcm_core.report.tables import Table, same_dataset
from tcm_core.report.values import MISSING, fmt, fmt_diff

# "matches": |ours − paper| <= this (FID points), for a FID measured with the paper's protocol (Inception, 50k
# samples, min over the seed sets). clean-fid's resize differs from the legacy TF resize of EDM/TCM's own scripts,
# so a difference above it may come from the measurement, not the network (docs/RELEASES.md).
MATCH_TOLERANCE_FID = 0.1
DIFFERENCE = "difference (ours − paper)"
MATCHES = f"matches (±{MATCH_TOLERANCE_FID:g} FID)"
HEADER = ["release", "role", "NFE", "metric", "paper", "ours", DIFFERENCE, MATCHES, "our metric", "paper source",
          "# param. (M, ours / paper)", "file sha256 (pinned)"]
ROLE_LABELS = {"stage1": "Stage 1 (ECT/ECM)", "stage2": "TCM Stage 2", "teacher": "teacher (diffusion)"}
NOT_SAMPLED = "not measured: a diffusion model's multi-step sampler is not part of this pipeline"


def matches(ours: float, paper: float, tolerance: float = MATCH_TOLERANCE_FID) -> bool:
    """Whether our FID is the paper's within ``tolerance`` FID points (either side)."""
    return abs(ours - paper) <= tolerance


def is_paper_protocol(record: dict[str, Any] | None, paper: PaperRow | None, preset: str) -> bool:
    """Our FID JSON measures what the paper's row does: the same extractor and sample count, the same data set."""
    return (record is not None and paper is not None and (record.get("extractor"), record.get("num")) == PAPER_SETUP
            and same_dataset(preset, paper.dataset))


def _match_cell(ours: float | None, paper: PaperRow | None, comparable: bool) -> str:
    if ours is None or paper is None or paper.fid is None:
        return MISSING
    if not comparable:
        return "n/a (not the paper's metric)"
    return "yes" if matches(ours, paper.fid) else "no"


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_release(folder: Path) -> dict[str, Any]:
    """A release folder: its record, its FID JSONs by NFE and its dFID JSON."""
    record = _read(folder / "release.json")
    if record is None:
        raise MissingFileError("no release record", str(folder / "release.json"), "run release-check first")
    fids = {n: _read(folder / "eval" / f"fid_{n}step.json") for n in record["steps"]}
    return {"record": record, "fids": fids, "dfid": _read(folder / "eval" / "dfid.json")}


def _paper_rows(paper: list[PaperRow], prefix: str) -> dict[int, PaperRow]:
    rows = {}
    for row in paper:
        head, _, nfe = row.key.rpartition("_")
        if head == prefix and nfe.isdigit():
            rows[int(nfe)] = row
    return rows


def _params_cell(record: dict[str, Any], paper: PaperRow | None) -> str:
    count = record.get("parameter_count")
    ours = f"{count / 1e6:.1f}" if isinstance(count, int) else MISSING
    return f"{ours} / {fmt(paper.params_m, 1) if paper and paper.params_m is not None else MISSING}"


def _sha_cell(record: dict[str, Any]) -> str:
    return f"{str(record.get('sha256_pinned'))[:12]}… ({record.get('sha256_source')})"


def fid_rows(release: dict[str, Any], paper: list[PaperRow], preset: str) -> list[list[str]]:
    """One row per NFE the release measures or the paper reports: paper, ours (min over seeds), difference, matches."""
    record = release["record"]
    by_nfe = _paper_rows(paper, record["paper_row"])
    rows = []
    for nfe in sorted(set(record["steps"]) | set(by_nfe)):
        p, measured = by_nfe.get(nfe), release["fids"].get(nfe)
        ours = float(measured["min"]) if measured else None
        comparable = is_paper_protocol(measured, p, preset)
        label = measured["label"] if measured else (NOT_SAMPLED if nfe not in record["steps"] else MISSING)
        rows.append([record["key"], ROLE_LABELS[record["role"]], str(nfe), "FID", fmt(p.fid if p else None),
                     fmt(ours), fmt_diff(ours, p.fid if p else None) if comparable else MISSING,
                     _match_cell(ours, p, comparable), label, p.source if p else MISSING, _params_cell(record, p),
                     _sha_cell(record)])
    return rows


def dfid_rows(release: dict[str, Any]) -> list[list[str]]:
    record, dfid = release["record"], release["dfid"]
    if not dfid:
        return []
    return [[record["key"], ROLE_LABELS[record["role"]], "1", f"dFID_t (t = {t})", MISSING, fmt(value), MISSING,
             MISSING, dfid["label"], MISSING, _params_cell(record, None), _sha_cell(record)]
            for t, value in dfid["values"].items()]


def _intro(preset: str, releases: list[dict[str, Any]], ref_meta: dict[str, Any], ref_path: Path | None
           ) -> list[str]:
    labels = sorted({f["label"] for r in releases for f in r["fids"].values() if f})
    two_step = "; ".join(f"{r['record']['key']}: 80, {r['record']['mid_t']:g}" for r in releases
                         if 2 in r["record"]["steps"])
    conditional = [r["record"]["key"] for r in releases if r["record"]["class_conditional"]]
    return [
        f"Preset: `{preset}`. Our metric: **{'; '.join(labels) or MISSING}**. Paper metric: **{PAPER_METRIC}**.",
        "",
        f"Protocol: the preset's `eval` block; FID is the minimum over the sampling seed sets; 2-step times: "
        f"{two_step or MISSING}; class-conditional (one uniform class per image): {', '.join(conditional) or 'none'}.",
        f"Reference statistics: computed by this pipeline from the dataset you provided "
        f"(`{ref_meta.get('dataset', MISSING)}`, {ref_meta.get('num', MISSING)} images, "
        f"{ref_meta.get('label', ref_meta.get('extractor', MISSING))}; `{ref_path or MISSING}`), not downloaded.",
        f"\"matches\": |ours − paper| <= {MATCH_TOLERANCE_FID:g} FID, judged only where our FID is the paper's metric "
        f"({PAPER_SETUP[0]}, {PAPER_SETUP[1]:,} samples, the same data set); elsewhere n/a.",
    ]


def released_table(preset: str, folders: list[Path], ref_stats: Path | None = None,
                   paper_values: Path | None = None) -> Table:
    paper = load_paper_values(paper_values)
    releases = [load_release(Path(f)) for f in folders]
    rows = []
    for release in releases:
        rows += fid_rows(release, paper, preset) + dfid_rows(release)
    ref_meta: dict[str, Any] = {}
    if ref_stats is not None:
        from tcm_core.evaluation.commands import load_ref_stats

        ref_meta = load_ref_stats(ref_stats).meta
    notes = ["A FID row whose metric reads 'not measured' is a diffusion teacher's multi-step FID (NFE 35 / 63): its "
             "sampler is not part of this pipeline; the teacher's dFID rows are measured.",
             "dFID_t: the release denoises training images from y + t·z in one call; the paper only draws dFID curves.",
             "Each file was pinned by its sha256 at first use (or by the registry's); a changed file is refused."]
    return Table("released", f"Released checkpoints vs the paper — preset {preset}", HEADER, rows,
                 intro=_intro(preset, releases, ref_meta, ref_stats), notes=notes)


def add_released_tables_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True)
    parser.add_argument("--releases", nargs="+", type=Path, required=True, help="results/P/releases/<key> folders")
    parser.add_argument("--ref-stats", type=Path, default=None, help="the reference statistics the FIDs used")
    parser.add_argument("--out", required=True, type=Path, help="the Markdown table (the CSV goes beside it)")
    parser.add_argument("--paper-values", type=Path, default=None)
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI: the tables become the parent's artifacts")
    parser.add_argument("--mlflow-parent", type=Path, default=None, help="mlflow.json of the study")


def run_released_tables(args: argparse.Namespace) -> int:
    table = released_table(args.preset, args.releases, args.ref_stats, args.paper_values)
    files = [args.out, args.out.with_suffix(".csv")]
    write_bytes_atomic(files[0], table.markdown().encode())
    write_bytes_atomic(files[1], table.csv_text().encode())
    print(table.markdown(), flush=True)
    if args.mlflow_parent and args.tracking_uri and args.tracking_uri.lower() != "none":
        from tcm_core.tracking.mlflow_store import log_on_parent

        log_on_parent(args.tracking_uri, args.mlflow_parent, files)
    return 0
