"""Wall time of every job of a Snakemake run, from its log (.snakemake/log/*.snakemake.log).

    python scripts/job_times.py LOG [--json OUT]

Prints one line per job (rule, wildcards' output, start offset, duration), the busy time per rule and the
total wall time from the first job's start to the last job's end.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
OUTPUT = re.compile(r"^\s+output: (.+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def parse(log: Path) -> list[dict]:
    """Jobs with rule, output, start and end times (seconds since the first job started)."""
    jobs: dict[int, dict] = {}
    stamp = pending = None
    for line in log.read_text().splitlines():
        if match := STAMP.match(line):
            stamp = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
        elif match := START.match(line):
            pending = {"rule": match.group(1), "start": stamp, "output": ""}
        elif pending is not None and (match := OUTPUT.match(line)):
            pending["output"] = match.group(1).split(",")[0]
        elif pending is not None and (match := JOBID.match(line)):
            jobs[int(match.group(1))] = pending
            pending = None
        elif (match := FINISHED.match(line)) and int(match.group(1)) in jobs:
            jobs[int(match.group(1))]["end"] = stamp
    done = [j for j in jobs.values() if "end" in j and j["start"] is not None]
    if not done:
        return []
    origin = min(j["start"] for j in done)
    for job in done:
        job["start_s"] = (job.pop("start") - origin).total_seconds()
        job["seconds"] = (job.pop("end") - origin).total_seconds() - job["start_s"]
    return sorted(done, key=lambda j: j["start_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    jobs = parse(args.log)
    if not jobs:
        print(f"no finished jobs in {args.log}")
        return 1
    for job in jobs:
        print(f"{job['start_s']:7.0f} s  {job['seconds']:7.0f} s  {job['rule']:18s} {job['output']}")
    per_rule: dict[str, float] = {}
    for job in jobs:
        per_rule[job["rule"]] = per_rule.get(job["rule"], 0.0) + job["seconds"]
    print("busy time per rule: " + ", ".join(f"{r} {s / 60:.1f} min" for r, s in per_rule.items()))
    total = max(j["start_s"] + j["seconds"] for j in jobs)
    print(f"total wall time: {total / 60:.1f} min ({len(jobs)} jobs)")
    if args.json:
        args.json.write_text(json.dumps({"jobs": jobs, "per_rule_s": per_rule, "total_s": total}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
