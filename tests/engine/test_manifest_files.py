"""User manifests as spreadsheets save them: Excel's "CSV UTF-8" starts with a byte-order mark, which had named the
first column "\\ufeffpath" (refused as "no 'path' column (columns: path, caption)", the mark invisible), broken a
JSONL's first line and stayed in a caption corpus's first text."""

import json

from otclip.engine.manifests import read_lines, read_rows

BOM = "\ufeff"


def test_a_byte_order_mark_is_read_past(tmp_path):
    csv_file, jsonl, txt = tmp_path / "m.csv", tmp_path / "m.jsonl", tmp_path / "c.txt"
    csv_file.write_text(BOM + "path,caption\nphotos/a.jpg,un chat tigré\n", encoding="utf-8")
    jsonl.write_text(BOM + json.dumps({"path": "a.jpg", "caption": "a cat"}) + "\n", encoding="utf-8")
    txt.write_text(BOM + "a cat\n\nun chien\n", encoding="utf-8")
    assert read_rows(csv_file) == [{"path": "photos/a.jpg", "caption": "un chat tigré"}]
    assert read_rows(jsonl) == [{"path": "a.jpg", "caption": "a cat"}]
    assert read_lines(txt) == ["a cat", "un chien"]


def test_a_csv_separated_by_semicolons_or_tabs_is_read(tmp_path):
    """Excel writes "path;caption" where the comma is the decimal mark (it had been one column named "path;caption")."""
    for separator in (";", "\t", ","):
        manifest = tmp_path / "m.csv"
        manifest.write_text(BOM + separator.join(["path", "caption", "price"]) + "\r\n"
                            + separator.join(["a.jpg", '"un chat, tigré"', '"3,5"']) + "\r\n", encoding="utf-8")
        assert read_rows(manifest) == [{"path": "a.jpg", "caption": "un chat, tigré", "price": "3,5"}], separator


def test_an_excel_csv_indexes_with_its_captions(tmp_path, capsys):
    from otclip.engine.sample_photos import write_sample_photos
    from otclip.main import main

    photos = write_sample_photos(tmp_path / "photos")[0].parent
    manifest = tmp_path / "photos.csv"
    manifest.write_bytes(b"\xef\xbb\xbfpath,caption\r\n" + f"{photos / 'chelsea.jpg'},un chat\r\n".encode())
    assert main(["index", str(manifest), "--out", str(tmp_path / "ix"), "--no-progress", "--no-query-export"]) == 0
    assert "1 indexed" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "ix"), "a cat", "--json", "--local"]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert found["text"] == "un chat" and found["path"] == str(photos / "chelsea.jpg")
