"""`otclip demo --data OTHER` over a demo index of other photos is refused before it writes anything."""

from otclip.app.demo import _refuse_other_data
from otclip.main import main


def test_another_data_folder_is_refused_before_its_photos_are_written(demo_index, tmp_path, capsys):
    index, other = demo_index / "index", tmp_path / "other"
    before = sorted(p.name for p in (demo_index / "data").rglob("*"))
    code = main(["demo", "--out", str(index), "--data", str(other), "--no-serve", "--fashion-mnist", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--data {(demo_index / 'data').resolve()}" in err and "another --out" in err
    assert not other.exists() and sorted(p.name for p in (demo_index / "data").rglob("*")) == before
    _refuse_other_data(index, demo_index / "data")  # its own folder, however it is spelled, passes
    _refuse_other_data(index, demo_index / "index" / ".." / "data")
    _refuse_other_data(tmp_path / "new-index", other)  # a new index: anything
