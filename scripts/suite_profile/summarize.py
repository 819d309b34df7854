"""Summarise what scripts/profile-suite.sh recorded: CPU seconds by command and by test (largest first)."""

import collections
import json
import sys
from pathlib import Path


def command(argv: list[str]) -> str:
    if argv and argv[0].endswith("tcm_core/__main__.py") and len(argv) > 1:
        return "tcm_core " + " ".join(argv[1:3] if argv[1] == "evaluate" else argv[1:2])
    if argv and "snakemake" in argv[0]:
        return "snakemake (job side)" if "--snakefile" in argv else "snakemake"
    return Path(argv[0]).name if argv else "?"


def main(folder: str, top: int = 20) -> None:
    records = [json.loads(p.read_text()) for p in Path(folder).glob("*.json")]
    total = sum(r["cpu_s"] for r in records)
    print(f"{len(records)} Python processes, {total:.0f} CPU seconds")
    for title, key in (("command", lambda r: command(r["argv"])), ("test", lambda r: r["test"] or "(none)")):
        sums: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for r in records:
            sums[key(r)][0] += 1
            sums[key(r)][1] += r["cpu_s"]
        print(f"\n| CPU s | processes | {title} |\n|---|---|---|")
        for name, (count, cpu) in sorted(sums.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"| {cpu:.0f} | {count} | {name} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
