"""The page's example queries are those its collection answers best (a fixed list offered "a rocket" and "a dress" over
anybody's photos): real indexes of photos and of clothes, the real default model."""

import pytest

from otclip.engine import fashion_mnist

from gallery import index_demo_photos

CLOTHES = {"a sneaker", "a dress", "a shirt", "a bag", "a coat", "trousers", "a sandal"}


def scored(searcher, queries):
    """Each query's best match (score, id), searched one at a time."""
    return [(r.score, r.id) for r in (searcher.search_text(q, k=1)[0] for q in queries)]


def test_a_photo_collection_is_offered_its_own_subjects(demo_index, default_model):
    from otclip.app.example_queries import CANDIDATES, SHOWN, suggest
    from otclip.engine.search import IndexSearcher

    searcher = IndexSearcher(demo_index / "index", model=default_model)
    offered = suggest(searcher)
    assert "a cat" in offered and not CLOTHES & set(offered)
    assert len(offered) == SHOWN and set(offered) <= set(CANDIDATES)
    best = scored(searcher, offered)
    assert [s for s, _ in best] == sorted((s for s, _ in best), reverse=True)
    assert len({i for _, i in best}) == len(best)  # one subject per best-matching photo
    # no candidate left out scores above the last one offered with a best match of its own
    taken = {i for _, i in best}
    left = [(s, i) for s, i in scored(searcher, [c for c in CANDIDATES if c not in offered]) if i not in taken]
    assert all(s <= best[-1][0] + 1e-6 for s, _ in left)


@pytest.mark.skipif(not fashion_mnist.available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_a_collection_of_clothes_is_offered_clothes(tmp_path, default_model):
    from otclip.app.example_queries import suggest
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images

    images, _ = fashion_mnist.load_split("test")
    (tmp_path / "clothes").mkdir()
    for i in range(60):
        fashion_mnist.to_photo(images[i]).save(tmp_path / "clothes" / f"{i:03d}.png")
    index_images(tmp_path / "clothes", tmp_path / "ix", default_model, progress=False, workers=0, query_models=False)
    offered = suggest(IndexSearcher(tmp_path / "ix", model=default_model))
    assert len(offered) >= 4 and set(offered) <= CLOTHES


def test_an_index_of_texts_alone_offers_none(tmp_path, default_model):
    from otclip.app.example_queries import suggest
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_texts

    (tmp_path / "captions.txt").write_text("a cat\na rocket\n")
    index_texts(tmp_path / "captions.txt", tmp_path / "ix", default_model, progress=False)
    assert suggest(IndexSearcher(tmp_path / "ix", model=default_model)) == []


def test_two_photos_are_offered_two_examples(demo_index, tmp_path, default_model):
    """Candidates whose best match is the same photo name one subject: one example for each photo."""
    from otclip.app.example_queries import suggest
    from otclip.engine.search import IndexSearcher

    index_demo_photos(demo_index, ["horse.jpg", "camera.jpg"], tmp_path / "farm", tmp_path / "ix", default_model)
    searcher = IndexSearcher(tmp_path / "ix", model=default_model)
    offered = suggest(searcher)
    assert len(offered) == 2 and len({i for _, i in scored(searcher, offered)}) == 2


def test_the_app_chooses_again_when_its_index_has_a_new_generation_only(demo_index, tmp_path, default_model,
                                                                       monkeypatch):
    """Chosen at the server's start only, a watched collection that grew kept offering its old subjects; chosen at
    every page load, each would cost a batch of the text tower."""
    from otclip.app import example_queries
    from otclip.app.search_app import SearchApp
    from otclip.engine.search import IndexSearcher

    index_demo_photos(demo_index, ["horse.jpg", "camera.jpg"], tmp_path / "farm", tmp_path / "ix", default_model)
    app = SearchApp(IndexSearcher(tmp_path / "ix", model=default_model))
    chosen = []
    suggest = example_queries.suggest
    monkeypatch.setattr(example_queries, "suggest", lambda searcher: chosen.append(1) or suggest(searcher))
    first = app.examples()
    assert app.examples() == first and "a cat" not in first and len(chosen) == 1
    index_demo_photos(demo_index, ["chelsea.jpg"], tmp_path / "farm", tmp_path / "ix", default_model)
    grown = app.examples()
    assert "a cat" in grown and len(chosen) == 2
    assert app.examples() == grown and len(chosen) == 2
