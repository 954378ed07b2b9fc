"""The HTTP JSON API, served beside the UI by the same server: a FastAPI app mounted at /api on Gradio's own.

  GET  /api/search?q=...           texts and indexed images (query language), filters, pages, order, collapse
  POST /api/search?...             the same, plus an uploaded image (multipart field `image`) added to q
  GET  /api/items/{id}             an item's metadata
  GET  /api/items/{id}/thumbnail   its display copy (JPEG)
  GET  /api/items/{id}/original    the indexed file itself
  GET  /api/info                   the index: model, sides, counts
  GET  /api/collections            the collections served (each endpoint takes ?collection=NAME; default: the first)
  GET  /api/docs, /api/openapi.json
Every search goes through the app's SearchApp (its model-call batching and thread budget), with the
semantics of `otclip search`. An image term of `q` must be an image the index lists: a request never
makes the server open any other file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from otclip.engine.errors import USER_ERRORS
from otclip.engine.filters import filters_from_strings
from otclip.engine.images import load_image, thumbnail, thumbnail_jpeg
from otclip.engine.query_language import Term, parse_query
from otclip.engine.result_export import results_csv
from otclip.engine.running_servers import INSTANCE_HEADER

if TYPE_CHECKING:
    from .server import SearchApp

MOUNT = "/api"
THUMBNAIL = "/items/{item_id}/thumbnail"  # routes below MOUNT that results link to
ORIGINAL = "/items/{item_id}/original"


@dataclass
class SearchParams:
    """The query string of both searches (FastAPI reads each field from it, and documents it)."""

    q: str | None = Query(None, description='texts and indexed images: "a beach" + /photos/ref.jpg - people')
    collection: str | None = Query(None, description="which collection (default: the first served)")
    target: Literal["images", "texts"] = "images"
    k: int = Query(10, ge=1, le=1000)
    offset: int = Query(0, ge=0)
    min_score: float | None = None
    order: Literal["score", "date"] = "score"
    collapse: float | None = Query(None, gt=0, le=1, description="leave out near-duplicates (cosine threshold)")
    under: str | None = Query(None, description="images below this folder")
    glob: str | None = Query(None, description="a shell pattern over the whole path")
    label: str | None = None
    where: list[str] = Query([], description="COLUMN=VALUE or COLUMN=LO..HI (repeatable)")
    after: str | None = Query(None, description="taken on or after this date (ISO)")
    before: str | None = Query(None, description="taken before this date (ISO)")
    orientation: Literal["landscape", "portrait", "square"] | None = None
    min_width: int | None = None
    min_height: int | None = None
    format: Literal["json", "csv"] = "json"


def _still_there(item_id: int, path: str) -> str:
    """`path`, or a 404 saying that the indexed file has gone since (not that the item does not exist)."""
    if not Path(path).is_file():
        raise HTTPException(404, f"item {item_id}'s file {path} is no longer there (moved or deleted since it was "
                                 "indexed: index its folder again)")
    return path


def build_api(apps: dict[str, SearchApp], max_upload_pixels: int, instance: str = "") -> FastAPI:
    """`instance`: this server's id (`running_servers`), sent with every search so that `otclip search`
    knows it asked the server it recorded."""
    api = FastAPI(title="otclip", summary="Text and image search over otclip indexes", docs_url="/docs")
    first = next(iter(apps))

    def pick(collection: str | None) -> SearchApp:
        if collection is not None and collection not in apps:
            raise HTTPException(404, f"no collection {collection!r}; serving: {', '.join(apps)}")
        return apps[collection or first]

    async def user_error(request: Request, exc: Exception) -> JSONResponse:  # one line, as the CLI prints it
        return JSONResponse({"detail": str(exc)}, status_code=400)

    for error in USER_ERRORS:
        api.add_exception_handler(error, user_error)

    def run(params: SearchParams, app: SearchApp, terms: list[Term]) -> Response:
        if not terms:
            raise HTTPException(400, "give q (texts and indexed images) or upload an image")
        filters = filters_from_strings(params.under, params.glob, params.label, params.where, params.after,
                                       params.before, params.orientation, params.min_width, params.min_height)
        page = app.search(terms, params.target, params.k, params.offset, params.min_score, filters, params.order,
                          params.collapse)
        headers = {INSTANCE_HEADER: instance}
        if params.format == "csv":
            return PlainTextResponse(results_csv(page.results), media_type="text/csv", headers=headers)
        body = page.to_dict()
        suffix = f"?collection={quote(app.name)}" if params.collection else ""
        for result in body["results"]:
            if params.target == "images":
                result["thumbnail"] = MOUNT + THUMBNAIL.format(item_id=result["id"]) + suffix
                result["original"] = MOUNT + ORIGINAL.format(item_id=result["id"]) + suffix
        return JSONResponse(body, headers=headers)

    def query_terms(app: SearchApp, q: str | None) -> list[Term]:
        return parse_query(q, allowed_image=app.searcher.lists_image) if q else []

    @api.get("/search", summary="search by texts and indexed images")
    def search(params: SearchParams = Depends()) -> Response:
        app = pick(params.collection)
        return run(params, app, query_terms(app, params.q))

    @api.post("/search", summary="search by an uploaded image, plus q")
    def search_upload(image: UploadFile = File(..., description="the query image"),
                      image_weight: float = Query(1.0, description="its weight in the query (negative excludes)"),
                      params: SearchParams = Depends()) -> Response:
        app = pick(params.collection)
        decoded = load_image(image.file.read(), name=image.filename or "upload", draft=app.searcher.image_draft,
                             max_pixels=max_upload_pixels)
        return run(params, app, [*query_terms(app, params.q), Term("image", decoded, image_weight)])

    @api.get("/items/{item_id}", summary="an item's metadata")
    def item(item_id: int, collection: str | None = None) -> dict:
        found = pick(collection).searcher.item(item_id)
        if found is None:
            raise HTTPException(404, f"no item has id {item_id}")
        return found

    @api.get(THUMBNAIL, summary="an indexed image's display copy (JPEG)")
    def item_thumbnail(item_id: int, collection: str | None = None) -> Response:
        searcher = pick(collection).searcher
        found = searcher.item(item_id)
        if found is None or found["side"] != "images":
            raise HTTPException(404, f"no indexed image has id {item_id}")
        kept = searcher.thumbnail_file(found["sha256"])
        if kept is not None:
            return FileResponse(kept, media_type="image/jpeg")
        return Response(thumbnail_jpeg(thumbnail(_still_there(item_id, found["key"]))), media_type="image/jpeg")

    @api.get(ORIGINAL, summary="an indexed image's file")
    def item_original(item_id: int, collection: str | None = None) -> Response:
        path = pick(collection).searcher.indexed_image(item_id)
        if path is None:
            raise HTTPException(404, f"no indexed image has id {item_id}")
        return FileResponse(_still_there(item_id, path))

    @api.get("/info", summary="the index: model, sides, counts")
    def info(collection: str | None = None) -> dict:
        return pick(collection).searcher.info()

    @api.get("/collections", summary="the collections served, the first being the default")
    def collections() -> list[str]:
        return list(apps)

    return api
