"""``sluiceway schemas``: list the event schemas, check a change, release a version.

* ``list``    every event schema: fingerprint, released versions, whether it changed.
* ``check``   lint every current schema, then compare it with its last release in both
              directions (backward: new reader, old data; forward: old reader, new data).
              Exit 1 when anything is incompatible, naming the field and why.
* ``release`` check, then copy each changed schema into ``history/<Name>/<n+1>.avsc``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.settings import Settings
from schemas.catalog import PACKAGE_ROOT, Catalog
from schemas.compat import check_change, lint


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "schemas", help="list, check and release the Avro event schemas"
    )
    parser.add_argument(
        "--schemas-dir",
        type=Path,
        default=PACKAGE_ROOT,
        help="catalog root holding avro/ and history/ (default: the schemas package)",
    )
    actions = parser.add_subparsers(dest="schemas_action", required=True, metavar="ACTION")
    actions.add_parser("list", help="list schemas, fingerprints and releases").set_defaults(
        handler=list_schemas
    )
    actions.add_parser(
        "check", help="fail when a schema breaks compatibility with its last release"
    ).set_defaults(handler=check_schemas)
    actions.add_parser(
        "release", help="record every changed schema as its next version (after a check)"
    ).set_defaults(handler=release_schemas)


def _catalog(args: argparse.Namespace) -> Catalog:
    root: Path = args.schemas_dir
    return Catalog(root)


def list_schemas(args: argparse.Namespace, settings: Settings) -> int:
    catalog = _catalog(args)
    rows = [("SCHEMA", "FINGERPRINT", "RELEASES", "CURRENT")]
    for name in catalog.names():
        current = catalog.current(name)
        releases = catalog.releases(name)
        if current.version is not None:
            state = f"= v{current.version}"
        elif releases:
            state = "changed, unreleased"
        else:
            state = "new, unreleased"
        rows.append(
            (
                name,
                current.fingerprint_bytes.hex(),
                ",".join(str(r.version) for r in releases) or "-",
                state,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _problems(catalog: Catalog) -> list[str]:
    """Every lint problem and incompatibility of the current schemas, as sentences."""
    problems: list[str] = []
    for name in catalog.names():
        current = catalog.current(name)
        problems += lint(current.short_name, current.raw)
        last = catalog.latest_release(name)
        if last is not None and current.version is None:
            problems += [f.message for f in check_change(current.short_name, last.raw, current.raw)]
    return problems


def check_schemas(args: argparse.Namespace, settings: Settings) -> int:
    catalog = _catalog(args)
    problems = _problems(catalog)
    for problem in problems:
        print(problem)
    if problems:
        print(f"schemas: {len(problems)} problem(s); compatibility is required in both directions")
        return 1
    for name in catalog.names():
        current = catalog.current(name)
        last = catalog.latest_release(name)
        if current.version is not None:
            print(f"{current.short_name}: unchanged since v{current.version}")
        elif last is None:
            print(f"{current.short_name}: new, not released yet")
        else:
            print(f"{current.short_name}: compatible with v{last.version} (backward and forward)")
    return 0


def release_schemas(args: argparse.Namespace, settings: Settings) -> int:
    catalog = _catalog(args)
    problems = _problems(catalog)
    if problems:
        for problem in problems:
            print(problem)
        print("schemas: not released; fix the problems above first")
        return 1
    released = 0
    for name in catalog.names():
        if catalog.current(name).version is None:
            entry = catalog.release(name)
            print(f"{entry.short_name}: released as v{entry.version} ({entry.path})")
            released += 1
    if not released:
        print("schemas: nothing to release")
    return 0
