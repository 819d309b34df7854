"""The released checkpoints a preset evaluates (``released_tables``): where the user drops them, the one line a
missing file gives, the sha256 pin at first use, and the ``release-check`` command.

A preset's ``releases`` block (config.yaml; docs/RELEASES.md)::

    releases:
      folder: resources/releases          # where released files are dropped (default)
      files:
        tcm_stage2: {name: tcm-cifar10, role: stage2, paper_row: t1_tcm, steps: [1, 2]}

Each entry is one row group of the table: ``role`` (stage1 | stage2 | teacher), ``paper_row`` (the prefix of its
``tcm_core/report/paper_values.csv`` keys, ``<paper_row>_<NFE>``), ``steps`` (the NFEs to measure: 1 is the time
T = 80, 2 is T then ``mid_t``, default the preset's ``eval.mid_t``, the paper's App. E), ``class_conditional``
(the file must be; sampling then draws a uniform class per image) and ``dfid`` (dFID at ``eval.dfid_ts``).
``name`` is a :data:`tcm_core.io.downloads.REGISTRY` entry (file name, download page, sha256 when published);
``file`` names the file when the registry has no name (or without a registry entry: a test's stand-in).

The file is ``<folder>/<file>``, or a file of that name anywhere below ``<folder>`` (a dropped folder, e.g. the
TCM Drive folder). ``release-check`` pins it: the registry's sha256 when known, else the ``FILE.sha256`` record
written at first use (:func:`tcm_core.io.hashing.pin_file`); a file that later differs is refused (exit 3), and
``load_network`` refuses it in every evaluation too. It reads the file without running anything from it
(:func:`tcm_core.io.network_files.inspect_checkpoint`) and refuses a file whose classes disagree with
``class_conditional``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tcm_core.errors import ConfigError, MissingFileError, RefusedFileError

DEFAULT_FOLDER = "resources/releases"
ROLES = ("stage1", "stage2", "teacher")
STEP_COUNTS = (1, 2)  # NFEs the consistency sampler measures: steps (T) and (T, mid_t)
NO_DOWNLOAD = "no public download: it is a stand-in network (tests/test_releases.py writes one in NVlabs' format)"


@dataclass(frozen=True)
class Release:
    """One released file of a preset, resolved (defaults filled, nothing about the file itself)."""

    key: str
    file: str
    folder: str
    role: str
    paper_row: str
    steps: tuple[int, ...]
    mid_t: float
    class_conditional: bool
    dfid: bool
    name: str | None = None
    url: str | None = None
    sha256: str | None = None
    manual: bool = False

    @property
    def path(self) -> Path:
        """Where the file goes (the missing-file line names it)."""
        return Path(self.folder) / self.file

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Release:
        return cls(**{**data, "steps": tuple(int(s) for s in data["steps"])})


# ---------------------------------------------------------------------------------------------------------- config


def _registry_entry(name: str | None, where: str) -> dict[str, Any]:
    from tcm_core.io.downloads import REGISTRY

    if name is None:
        return {}
    if name not in REGISTRY or REGISTRY[name]["format"] == "folder":
        usable = [n for n, e in REGISTRY.items() if e["format"] != "folder"]
        raise ConfigError(f"unknown release name {name!r}", f"{where}.name", f"use one of {', '.join(usable)}")
    return REGISTRY[name]


def _release(key: str, entry: dict[str, Any], folder: str, mid_t: float | None, where: str) -> Release:
    registry = _registry_entry(entry.get("name"), where)
    file = entry.get("file") or registry.get("filename") or (f"{entry['name']}.pkl" if entry.get("name") else None)
    if not file:
        raise ConfigError("a release needs a registry name or a file name", where, "set name or file")
    steps = tuple(sorted({int(s) for s in entry.get("steps", STEP_COUNTS)}))
    if any(s not in STEP_COUNTS for s in steps):
        raise ConfigError(f"steps {list(steps)} are not NFEs of the sampler", f"{where}.steps", "use 1 and/or 2")
    chosen_mid_t = entry.get("mid_t", mid_t)
    if 2 in steps and chosen_mid_t is None:
        raise ConfigError("2-step sampling needs a middle time", f"{where}.mid_t", "set it or the preset's eval.mid_t")
    return Release(key=key, file=str(file), folder=folder, role=entry["role"], paper_row=entry["paper_row"],
                   steps=steps, mid_t=float(chosen_mid_t) if chosen_mid_t is not None else 0.0,
                   class_conditional=bool(entry.get("class_conditional", False)), dfid=bool(entry.get("dfid", True)),
                   name=entry.get("name"), url=entry.get("url") or registry.get("url"),
                   sha256=registry.get("sha256") or entry.get("sha256"), manual=bool(registry.get("manual", False)))


def release_entries(preset: dict[str, Any], where: str = "presets.<preset>") -> list[Release]:
    """The preset's releases, in config order, with every default filled (none: an empty list)."""
    block = preset.get("releases") or {}
    folder = str(block.get("folder") or DEFAULT_FOLDER)
    mid_t = (preset.get("eval") or {}).get("mid_t")
    files = block.get("files") or {}
    return [_release(key, entry, folder, mid_t, f"{where}.releases.files.{key}") for key, entry in files.items()]


def check_releases(preset: dict[str, Any], where: str) -> list[Release]:
    """The releases block as a job would refuse it: names, steps, middle times and the paper's rows they compare."""
    from tcm_core.report.paper import load_paper_values
    from tcm_core.schedules import T_MAX

    keys = {row.key for row in load_paper_values() if row.key}
    found = release_entries(preset, where)
    for release in found:
        at = f"{where}.releases.files.{release.key}"
        if 2 in release.steps and not 0 < release.mid_t < T_MAX:
            raise ConfigError(f"mid_t {release.mid_t} is outside (0, {T_MAX:g})", f"{at}.mid_t", "choose a time inside")
        if not any(k.startswith(release.paper_row + "_") for k in keys):
            raise ConfigError(f"no paper value has a key {release.paper_row}_<NFE>", f"{at}.paper_row",
                              "use a key prefix of tcm_core/report/paper_values.csv (e.g. t1_tcm)")
    return found


# ---------------------------------------------------------------------------------------------------------- files


def locate(release: Release) -> Path | None:
    """The release's file: ``<folder>/<file>``, else the one file of that name below ``<folder>``; None if absent."""
    if release.path.is_file():
        return release.path
    folder = Path(release.folder)
    found = sorted(p for p in folder.rglob(release.file) if p.is_file()) if folder.is_dir() else []
    if len(found) > 1:
        raise ConfigError(f"{len(found)} files named {release.file} below {folder}: {', '.join(map(str, found[:3]))}",
                          f"releases.files.{release.key}", "keep one, or name the file with `file:`")
    return found[0] if found else None


def download_hint(release: Release) -> str:
    if not release.url:
        return NO_DOWNLOAD
    if release.manual:
        return f"download it from {release.url} (Google Drive: in a browser)"
    return (f"download it from {release.url} (or `python -m tcm_core fetch --name {release.name} "
            f"--out {release.path}`)")


def missing_error(release: Release) -> MissingFileError:
    """The one line of a missing release: what, which file, where to put it and where to download it from."""
    return MissingFileError(f"released checkpoint '{release.key}' ({release.role}) not found", str(release.path),
                            f"put it at {release.path} (or anywhere below {release.folder}/); "
                            f"{download_hint(release)}")


def require(release: Release) -> Path:
    found = locate(release)
    if found is None:
        raise missing_error(release)
    return found


def check_release_file(release: Release) -> dict[str, Any]:
    """Pin and read the release (nothing in it runs); the record ``released_tables`` reads beside the evaluations."""
    from tcm_core.io.hashing import pin_file
    from tcm_core.io.network_files import inspect_checkpoint

    path = require(release)
    info = inspect_checkpoint(path)  # the allow-list unpickler: nothing from the file is executed
    digest, first = pin_file(path, release.sha256, digest=info["sha256"])
    label_dim = int((info.get("arch") or {}).get("label_dim", 0) or 0)
    if (label_dim > 0) != release.class_conditional:
        said = "class-conditional" if release.class_conditional else "unconditional"
        raise RefusedFileError(f"the file has label_dim {label_dim} but the release '{release.key}' is {said}",
                               str(path), f"check that it is the release you meant, or set class_conditional: "
                               f"{str(label_dim > 0).lower()} in its config entry")
    if first:
        print(f"recorded sha256 {digest} in {path}.sha256: a changed file is refused from now on")
    return {**release.as_dict(), "located": str(path), "sha256_pinned": digest, "sha256_source":
            "registry" if release.sha256 else "recorded at first use", "format": info.get("format"),
            "class_name": info.get("class_name"), "arch": info.get("arch"), "label_dim": label_dim,
            "parameter_count": info.get("parameter_count")}


# ---------------------------------------------------------------------------------------------------------- CLI


def add_release_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--release", required=True, help="the resolved release entry as JSON (Release.as_dict)")
    parser.add_argument("--out", required=True, type=Path, help="the record JSON (path, sha256, arch, role)")


def run_release_check(args: argparse.Namespace) -> int:
    from tcm_core.evaluation.commands import write_json

    try:
        release = Release.from_dict(json.loads(args.release))
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"not a release entry ({error})", "--release", "pass Release.as_dict() as JSON") from None
    record = check_release_file(release)
    write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("key", "located", "sha256_pinned", "parameter_count")}))
    return 0
