"""manifest.json read defensively: every field the readers index is checked, so damage is one line naming the file
(which `repair` writes again), and an index from a newer otclip is refused by every command, `repair` included."""

import json

import pytest
from synthetic_index import clustered, make_index

from otclip.engine.errors import IndexDirectoryError, NewerIndexFormatError
from otclip.engine.index_directory import IndexDirectory
from otclip.main import main

DAMAGE = [
    (lambda m: m.update(model="effnet-minilm"), "its model entry is damaged"),
    (lambda m: m["model"].pop("checksum"), "its model entry is damaged"),
    (lambda m: m.update(dim="16"), "its dim is damaged"),
    (lambda m: m.update(dim=0), "its dim is damaged"),
    (lambda m: m.update(format_version="1"), "its format_version is damaged"),
    (lambda m: m.update(max_index_memory="4G"), "its max_index_memory is damaged"),
    (lambda m: m.update(sides=["images"]), "its sides entry is damaged"),
    (lambda m: m["sides"].update(images="x"), "side entry 'images' damaged"),
    (lambda m: m["sides"]["images"].update(generation="1"), "side entry 'images' damaged"),
    (lambda m: m["sides"]["images"].pop("factory"), "side entry 'images' damaged"),
    (lambda m: m["sides"].update(videos=m["sides"]["images"]), "side entry 'videos' damaged"),
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest") / "ix"
    make_index(root, clustered(200, seed=1), "Flat")
    return root


@pytest.mark.parametrize("damage, expected", DAMAGE)
def test_a_damaged_field_is_one_line_naming_the_manifest(index, damage, expected, capsys):
    path = index / "manifest.json"
    good = path.read_text()
    manifest = json.loads(good)
    damage(manifest)
    path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(IndexDirectoryError) as raised:
            IndexDirectory(index).manifest()
        assert str(raised.value).startswith(f"{path}: {expected}") and f"otclip repair {index}" in str(raised.value)
        assert not isinstance(raised.value, NewerIndexFormatError)
        assert main(["check", str(index)]) == 1
        out = capsys.readouterr().out
        assert f"{path}: {expected}" in out and "Traceback" not in out
    finally:
        path.write_text(good)
    assert IndexDirectory(index).manifest() == json.loads(good)  # the valid manifest reads as written


def test_an_index_of_a_newer_format_is_refused_and_left_as_it_is(index, capsys):
    path = index / "manifest.json"
    good = path.read_text()
    newer = json.dumps({**json.loads(good), "format_version": 99, "model": "a layout this otclip does not know"})
    path.write_text(newer)
    try:
        with pytest.raises(NewerIndexFormatError, match="index format 99 is newer than this otclip"):
            IndexDirectory(index).manifest()
        for command in ("check", "repair", "info"):
            assert main([command, str(index)]) == 2
            assert "index format 99 is newer than this otclip" in capsys.readouterr().err
        assert path.read_text() == newer and not list(index.glob("manifest.json.damaged-*"))
    finally:
        path.write_text(good)
