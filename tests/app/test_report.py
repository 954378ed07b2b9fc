import json

from otclip.app.reports import report_markdown, report_plots, report_tables


def test_eval_report_becomes_a_table():
    report = {"model": {"name": "m", "checksum": "x"}, "text_to_image": {"R@1": 0.5, "R@5": 0.75},
              "image_to_text": {"R@1": 0.25, "R@5": 0.5}}
    table = report_tables(report)
    assert "| text to image | 0.500 | 0.750 |" in table and "| image to text | 0.250 | 0.500 |" in table
    through_index = report_tables({"text_to_image": {"R@1": 0.5, "mean_rank": 7.25, "not_returned": 2}})
    assert "| text to image | 0.500 | 7.250 | 2 |" in through_index  # a count, not a ratio


def test_nested_blocks_become_tables_and_markdown_wins(tmp_path):
    data = {"headline_gap_closed": {"fashion": {"ot-loop": 0.1, "mmcl-pseudo": 0.3, "ot-match": None}}}
    assert "### headline gap closed" in report_tables(data)
    assert "| fashion | 0.100 | 0.300 | n/a |" in report_tables(data)
    path = tmp_path / "partial_pairs.json"
    path.write_text(json.dumps(data))
    assert "headline gap closed" in report_markdown(path)
    (tmp_path / "partial_pairs.md").write_text("# From the experiment")
    (tmp_path / "partial_pairs-recall.png").write_bytes(b"png")
    (tmp_path / "partial_pairs-pair-positives-recall.png").write_bytes(b"png")  # another report's plot
    (tmp_path / "unrelated.png").write_bytes(b"png")
    assert report_markdown(path) == "# From the experiment"
    assert len(report_plots(path)) == 2  # no list in the JSON: the PNGs named after its stem
    path.write_text(json.dumps({**data, "plots": ["partial_pairs-recall.png", "partial_pairs-gone.png"]}))
    assert [p.split("/")[-1] for p in report_plots(path)] == ["partial_pairs-recall.png"]
