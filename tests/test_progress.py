"""What a person sees while a run moves and when it ends: progress lines and the headline summary."""

from __future__ import annotations

import io
import json

from tcm_core.report.headline import headline_lines
from tcm_core.tracking.progress import LineProgress, format_duration


def test_line_progress_writes_counts_rate_and_eta_and_the_last_line():
    out = io.StringIO()
    bar = LineProgress(10, "fid_1step", every=3600.0, stream=out)
    for _ in range(9):
        bar.update(1)
    assert out.getvalue() == ""  # not yet: fewer than `every` seconds
    bar.update(1)
    line = out.getvalue().strip()
    assert line.startswith("fid_1step: 10/10 img (100%), ") and "img/s, ETA 0m00s" in line


def test_format_duration():
    assert (format_duration(7.4), format_duration(247), format_duration(3723)) == ("0m07s", "4m07s", "1h02m03s")
    assert format_duration(float("nan")) == "?"


def test_headline_reads_the_evaluations_and_marks_what_is_missing(tmp_path):
    for run, value in (("stage1", 149.2), ("stage2/main", 40.8)):
        folder = tmp_path / run / "eval"
        folder.mkdir(parents=True)
        (folder / "fid_1step.json").write_text(json.dumps({"min": value, "label": "FID (LeNet features, 1k)"}))
    lines = headline_lines(tmp_path)
    assert lines[0] == "Headline results (FID (LeNet features, 1k), lower is better):"
    assert "149.20" in lines[1] and lines[1].count("—") == 1  # 2-step not evaluated yet
    assert lines[2].count("—") == 2 and "40.80" in lines[3]
