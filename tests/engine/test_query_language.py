"""The query language (#11): parsing, errors, and the combined vector against hand-computed cases."""

import numpy as np
import pytest

from otclip.engine.query_language import QueryError, Term, combine, format_query, parse_query


@pytest.fixture
def ref(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref.jpg").write_bytes(b"not read by the parser")
    return tmp_path / "ref.jpg"


def test_texts_images_weights_and_exclusions(ref):
    assert parse_query('"a beach" + ./ref.jpg - people') == [
        Term("text", "a beach", 1.0), Term("image", str(ref), 1.0), Term("text", "people", -1.0)]
    assert parse_query("2:cat + 0.5:dog") == [Term("text", "cat", 2.0), Term("text", "dog", 0.5)]
    assert parse_query("./ref.jpg + night") == [Term("image", str(ref), 1.0), Term("text", "night", 1.0)]
    assert parse_query("- people + beach") == [Term("text", "people", -1.0), Term("text", "beach", 1.0)]
    assert parse_query("a red t-shirt - a blue one") == [Term("text", "a red t-shirt", 1.0),
                                                         Term("text", "a blue one", -1.0)]
    assert parse_query('"ref.jpg" + "a + b"') == [Term("text", "ref.jpg", 1.0), Term("text", "a + b", 1.0)]
    assert parse_query("3:ref.jpg") == [Term("image", str(ref), 3.0)]


@pytest.mark.parametrize("query,message", [
    ("", "empty query"), ("   ", "empty query"), ("cat + ", r"'\+' with no term"), ("cat + - dog", "with no term"),
    ('"a beach + dog', "quote is not closed"), ("0:cat", "must be positive"), ("./nope.jpg + cat", "no such file"),
    ("- cat", "only exclusions"), ('""', "empty quoted term"), ("https://example.com/a.jpg", "is a URL"),
])
def test_malformed_queries_are_one_line(query, message, ref):
    with pytest.raises(QueryError, match=message) as caught:
        parse_query(query)
    assert "\n" not in str(caught.value)


def test_a_server_allows_only_indexed_images_and_never_looks_at_the_disk(ref):
    indexed = {"/photos/a.jpg"}
    assert parse_query("/photos/a.jpg + sea", allowed_image=indexed.__contains__)[0] == Term("image", "/photos/a.jpg")
    for probe in (str(ref), "/etc/passwd", "./ref.jpg"):
        with pytest.raises(QueryError, match="not in the index"):
            parse_query(f"{probe} + sea", allowed_image=indexed.__contains__)


def test_the_combined_vector_is_the_normalised_weighted_sum_of_normalised_embeddings():
    """Hand-computed: x -> (3, 0) and y -> (0, 0.5) are normalised to (1, 0) and (0, 1) before weighting."""
    table = {"x": [3.0, 0.0], "y": [0.0, 0.5], "img": [0.0, -2.0]}

    def encode(values):
        return np.array([table[v] for v in values])

    def vector(query):
        return combine(parse_query(query), encode, encode)

    assert np.allclose(vector("x + y"), [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    assert np.allclose(vector("2:x - y"), [2 / 5 ** 0.5, -1 / 5 ** 0.5], atol=1e-6)
    terms = [Term("text", "x", 1.0), Term("image", "img", 3.0)]  # image (0, -1) x 3
    assert np.allclose(combine(terms, encode, encode), [1 / 10 ** 0.5, -3 / 10 ** 0.5], atol=1e-6)
    with pytest.raises(QueryError, match="cancel out"):
        vector("x - x")


def test_a_parsed_query_is_written_back_to_one_that_parses_the_same(ref):
    """What `otclip search` sends a running server: hand-written expectations, then the round trip."""
    terms = parse_query('- people + 2:"a beach" + ./ref.jpg - 0.25:night')
    assert format_query(terms) == f'- "people" + 2:"a beach" + {ref} - 0.25:"night"'
    cases = [[Term("text", 'a "quoted" word', 1e-05)], [Term("text", "a + b", -3.5), Term("text", "c", 1.0)],
             [Term("image", str(ref), 1.5), Term("text", "ref.jpg", 1.0)], terms]
    for case in cases:
        assert parse_query(format_query(case)) == case
    assert format_query([Term("text", "x"), Term("image", b"uploaded bytes")]) is None
    assert format_query([Term("image", "/photos/a - b.jpg")]) is None  # ' - ' would split it
