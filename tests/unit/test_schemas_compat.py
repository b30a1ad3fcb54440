"""The compatibility checker (both directions) and ``sluiceway schemas list|check|release``."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from schemas import default_catalog
from schemas.catalog import PACKAGE_ROOT
from schemas.compat import Kind, can_read, check_change, lint
from sluiceway import main


def _record(*fields: dict[str, Any], name: str = "R") -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "t", "fields": list(fields)}


def _kinds(reader: Any, writer: Any) -> list[tuple[str, Kind]]:
    return [(i.path, i.kind) for i in can_read(reader, writer)]


def test_identical_schemas_are_compatible() -> None:
    for name in default_catalog().names():
        raw = default_catalog().current(name).raw
        assert check_change(name, raw, raw) == []


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("int", "long"),
        ("int", "double"),
        ("long", "float"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    ],
)
def test_promotions(writer: str, reader: str) -> None:
    assert can_read(reader, writer) == []
    if (reader, writer) not in (("string", "bytes"), ("bytes", "string")):
        assert _kinds(writer, reader) == [("", Kind.TYPE_CHANGED)]


def test_added_field_needs_a_default_for_backward() -> None:
    old = _record({"name": "a", "type": "string"})
    new = _record({"name": "a", "type": "string"}, {"name": "tenant", "type": "string"})
    [finding] = check_change("InferenceRequest", old, new)
    assert finding.direction == "backward"
    assert finding.message == (
        "InferenceRequest: field 'tenant' added without a default: old data cannot be read "
        "(backward)"
    )
    with_default = _record(
        {"name": "a", "type": "string"},
        {"name": "tenant", "type": ["null", "string"], "default": None},
    )
    assert check_change("R", old, with_default) == []


def test_removed_field_without_default_breaks_forward() -> None:
    old = _record({"name": "a", "type": "string"}, {"name": "b", "type": "long"})
    new = _record({"name": "a", "type": "string"})
    [finding] = check_change("R", old, new)
    assert finding.direction == "forward"
    assert "field 'b' removed" in finding.message
    assert finding.message.endswith("new data cannot be read by old readers (forward)")


def test_enum_symbols_and_defaults() -> None:
    def enum(*symbols: str, default: str | None = None) -> dict[str, Any]:
        e: dict[str, Any] = {"type": "enum", "name": "S", "symbols": list(symbols)}
        if default:
            e["default"] = default
        return _record({"name": "s", "type": e})

    findings = check_change("R", enum("a", "b"), enum("a", "b", "c"))
    assert [(f.direction, f.incompatibility.kind) for f in findings] == [
        ("forward", Kind.ENUM_SYMBOLS)
    ]
    assert "added enum symbol(s) c" in findings[0].message
    assert check_change("R", enum("a", "b", default="a"), enum("a", "b", "c", default="a")) == []


def test_unions_nested_records_arrays_and_maps() -> None:
    inner = {"type": "record", "name": "In", "fields": [{"name": "x", "type": "int"}]}
    old = _record(
        {"name": "v", "type": ["null", "string"], "default": None},
        {"name": "items", "type": {"type": "array", "items": inner}},
    )
    new = copy.deepcopy(old)
    new["fields"][0]["type"] = ["null", "string", "long"]  # branch added: forward breaks
    new["fields"][1]["type"]["items"]["fields"][0]["type"] = "string"  # int -> string
    found = {
        (f.direction, f.incompatibility.path, f.incompatibility.kind)
        for f in check_change("R", old, new)
    }
    assert found == {
        ("forward", "v", Kind.UNION_BRANCH),
        ("backward", "items[].x", Kind.TYPE_CHANGED),
        ("forward", "items[].x", Kind.TYPE_CHANGED),
    }
    maps = _record({"name": "m", "type": {"type": "map", "values": "int"}})
    wider = _record({"name": "m", "type": {"type": "map", "values": "long"}})
    assert can_read(wider, maps) == []


def test_renames_need_an_alias() -> None:
    old = _record({"name": "a", "type": "string"}, name="Old")
    new = _record({"name": "a", "type": "string"}, name="New")
    assert _kinds(new, old) == [("", Kind.NAME_CHANGED)]
    new["aliases"] = ["Old"]
    assert can_read(new, old) == []


def test_lint_flags_defaults_that_do_not_fit_the_first_branch() -> None:
    bad = _record({"name": "x", "type": ["string", "null"], "default": None})
    [problem] = lint("R", bad)
    assert "field 'R.x' has default None" in problem
    for name in default_catalog().names():
        assert lint(name, default_catalog().current(name).raw) == []


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    shutil.copytree(PACKAGE_ROOT / "avro", root / "avro")
    shutil.copytree(PACKAGE_ROOT / "history", root / "history")
    return root


def _edit(root: Path, name: str, edit: Any) -> None:
    path = root / "avro" / f"{name}.avsc"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw, indent=2))


def test_cli_list_and_check_pass_on_the_shipped_schemas(
    catalog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schemas", "--schemas-dir", str(catalog_dir), "list"]) == 0
    out = capsys.readouterr().out
    assert "io.sluiceway.v1.InferenceRequest" in out
    assert "= v1" in out
    assert main(["schemas", "--schemas-dir", str(catalog_dir), "check"]) == 0
    assert "InferenceRequest: unchanged since v1" in capsys.readouterr().out


def test_cli_check_fails_on_a_breaking_change(
    catalog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(
        catalog_dir,
        "InferenceRequest",
        lambda raw: raw["fields"].append({"name": "region", "type": "string"}),
    )
    assert main(["schemas", "--schemas-dir", str(catalog_dir), "check"]) == 1
    out = capsys.readouterr().out
    assert (
        "InferenceRequest: field 'region' added without a default: old data cannot be read "
        "(backward)" in out
    )
    assert main(["schemas", "--schemas-dir", str(catalog_dir), "release"]) == 1
    assert not (catalog_dir / "history" / "InferenceRequest" / "2.avsc").exists()


def test_cli_release_records_a_compatible_change_as_the_next_version(
    catalog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(
        catalog_dir,
        "Feedback",
        lambda raw: raw["fields"].append(
            {"name": "region", "type": ["null", "string"], "default": None}
        ),
    )
    assert main(["schemas", "--schemas-dir", str(catalog_dir), "check"]) == 0
    assert "Feedback: compatible with v1 (backward and forward)" in capsys.readouterr().out
    assert main(["schemas", "--schemas-dir", str(catalog_dir), "release"]) == 0
    assert "Feedback: released as v2" in capsys.readouterr().out
    released = catalog_dir / "history" / "Feedback" / "2.avsc"
    assert released.read_bytes() == (catalog_dir / "avro" / "Feedback.avsc").read_bytes()
    assert main(["schemas", "--schemas-dir", str(catalog_dir), "release"]) == 0
    assert "nothing to release" in capsys.readouterr().out
