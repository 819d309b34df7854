"""Summarise what scripts/profile-suite.sh recorded: CPU seconds by command and by test (largest first)."""

import collections
import json
import sys
from pathlib import Path

from proclog_site import LOADED


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
        groups: dict[str, list[dict]] = collections.defaultdict(list)
        for r in records:
            groups[key(r)].append(r)
        print(f"\n| CPU s | processes | loaded {' / '.join(LOADED)} | {title} |\n|---|---|---|---|")
        for name, group in sorted(groups.items(), key=lambda kv: -sum(r["cpu_s"] for r in kv[1]))[:top]:
            loaded = " / ".join(str(sum(m in r["loaded"] for r in group)) for m in LOADED)
            print(f"| {sum(r['cpu_s'] for r in group):.0f} | {len(group)} | {loaded} | {name} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
