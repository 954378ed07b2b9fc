"""The Gradio UI: text -> image, image -> text and image -> image over one or more collections (index
directories), with the filters, order, near-duplicate collapse, "more results" pages and CSV export of
`otclip search`, by the same engine calls (`SearchApp.search`)."""

from __future__ import annotations

import datetime
from pathlib import Path

import gradio as gr
from gradio.data_classes import GradioModel, GradioRootModel
from gradio.utils import is_prop_update

from otclip.engine.filters import Filters, filters_from_strings
from otclip.engine.images import ImageDecodeError, thumbnail

from .http_api import MOUNT as API_MOUNT
from .http_api import ORIGINAL as API_ORIGINAL
from .image_uploads import accept_images
from .inline_gallery import inline_gallery
from .reports import report_markdown, report_plots
from .search_app import MAX_UPLOAD_PIXELS, SearchApp

ORIGINAL_ROUTE = API_MOUNT + API_ORIGINAL  # an indexed image's original file, by id; nothing else
# The page's own searches (its three buttons and the query box): one HTTP POST each (Gradio's /run route), not
# the queue's join + event stream + its 1 ms polling loop (benchmarks/app_load.py, text -> image page at one
# user: 33 ms queued, 24-31 ms so; the HTTP JSON API 16-20). The queue's bound on concurrent calls is kept by
# launch(max_threads=...); model calls are batched either way (MicroBatcher). The named endpoints (hidden
# buttons) stay queued, as gradio_client expects; so does a click on a result (Gradio passes its event data
# only to a function whose own signature asks for it).
PAGE_EVENT = {"api_name": False, "queue": False, "preprocess": False, "postprocess": False}  # with _unqueued (below)


def _image_input(elem_id: str) -> gr.Image:
    """An image query, handed to the app as the uploaded file's path, so that `load_image` checks the header's size
    and aspect ratio before any pixel is decoded; any format `otclip index` reads (`image_uploads`)."""
    box = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"], elem_id=elem_id)
    return accept_images(box, MAX_UPLOAD_PIXELS)


def index_panel(app: SearchApp) -> str:
    info = app.searcher.info()
    lines = [f"**{app.name}**: model {info['model']['name']} (weights `{info['model']['checksum'][:12]}`), "
             f"dimension {info['dim']}, {info['metric']}"]
    for side, s in info["sides"].items():
        when = datetime.datetime.fromtimestamp(s["updated"]).strftime("%Y-%m-%d %H:%M")
        lines.append(f"**{side.capitalize()}** {s['items']} ({s['index_type']}, factory `{s['factory']}`, built {when})")
    if "texts" not in info["sides"]:
        lines.append("No text side: image -> text needs `otclip index-texts`.")
    return "  \n".join(lines)


def _filters(under: str, glob: str, label: str, where: str, after: str, before: str, orientation: str) -> Filters:
    """The filter fields as `otclip search` reads its flags (`--where` items separated by `;`)."""
    try:
        return filters_from_strings(under, glob, label, [w.strip() for w in (where or "").split(";")], after, before,
                                    None if orientation in (None, "", "any") else orientation)
    except ValueError as exc:
        raise gr.Error(str(exc)) from None


def build_ui(apps: dict[str, SearchApp], report: Path | None = None) -> gr.Blocks:
    names = list(apps)
    with gr.Blocks(title="otclip") as ui:
        gr.Markdown("# otclip - text and image search")
        collection = gr.Dropdown(names, value=names[0], label="Collection", visible=len(names) > 1,
                                 elem_id="collection")
        with gr.Accordion("Index", open=False):
            gr.Markdown("\n\n".join(index_panel(app) for app in apps.values()))
        with gr.Row():
            k = gr.Slider(1, 50, value=12, step=1, label="k")
            min_score = gr.Slider(-1, 1, value=-1, step=0.01, label="minimum score")
        with gr.Accordion("Filters and order", open=False, elem_id="filters"):
            with gr.Row():
                under = gr.Textbox(label="Folder", placeholder="/photos/2024", elem_id="f-under")
                glob = gr.Textbox(label="Path pattern", placeholder="*/beach/*.jpg", elem_id="f-glob")
                label = gr.Textbox(label="Label", elem_id="f-label")
            with gr.Row():
                where = gr.Textbox(label="Columns", placeholder="year=2019..2021; camera=X100", elem_id="f-where")
                after = gr.Textbox(label="Taken on or after", placeholder="2024-06-01", elem_id="f-after")
                before = gr.Textbox(label="Taken before", placeholder="2024-09-01", elem_id="f-before")
            with gr.Row():
                orientation = gr.Dropdown(["any", "landscape", "portrait", "square"], value="any", label="Orientation")
                order = gr.Radio(["score", "date"], value="score", label="Order (date: the best 1000, newest first)",
                                 elem_id="f-order")
                collapse = gr.Slider(0, 1, value=0, step=0.01, label="Hide near-duplicates above (0: off)",
                                     elem_id="f-collapse")
        settings = [k, min_score, under, glob, label, where, after, before, orientation, order, collapse]

        def find(name, query, image, k, min_score, under, glob, label, where, after, before, orientation, order,
                 collapse, offset=0):
            app = apps[name]
            filters = _filters(under, glob, label, where, after, before, orientation)
            page = app.search(app.terms(query, image), "images", int(k), int(offset), float(min_score), filters,
                              order, float(collapse) or None)
            tiles, status, ids = app.gallery(page.results, min_score)
            return tiles, status, ids, page

        with gr.Tab("Text -> image"):
            with gr.Row():
                query = gr.Textbox(label="Query (texts, indexed images' paths, 2:weights, - exclusions)",
                                   placeholder="a cat", scale=4, elem_id="query")
                search = gr.Button("Search", variant="primary", scale=1, elem_id="search")
            built_with = apps[names[0]].examples()  # as the server starts
            examples = _examples(query, built_with)
            examples.click(lambda sample: sample[0], examples, query, queue=False, show_progress="hidden", api_name=False)
            collection.change(lambda name: _examples(query, apps[name].examples()), collection, examples, queue=False,
                              show_progress="hidden", api_name=False)

            def opened(name: str):
                """A page opened after its collection's index changed (a watch, a re-index) offers its subjects now;
                otherwise the examples it was built with stay (not re-rendered under a first click)."""
                offered = apps[name].examples()
                return gr.skip() if name == names[0] and offered == built_with else _examples(query, offered)

            ui.load(opened, collection, examples, queue=False, show_progress="hidden", api_name=False)
            status = gr.Markdown(elem_id="t2i-status")
            gallery = inline_gallery(label="Results", columns=6, height="auto", elem_id="t2i-gallery")
            with gr.Row():
                more = gr.Button("More results", visible=False, elem_id="t2i-more")
                download = gr.DownloadButton("Results as CSV", visible=False, elem_id="t2i-csv")
            shown = gr.State([])  # (tiles, ids, results) shown so far, for "more results" and click-to-search
            last_results = gr.State([])  # the ids of the indexed images behind the gallery
            buttons = gr.State((False, False))  # whether the page shows "more results" and the CSV button

            def first_page(name, query, *values):
                *values, sent = values
                tiles, status_line, ids, page = find(name, query, None, *values)
                csv = apps[name].csv_file(page.results) if page.results else None
                return (tiles, status_line, ids, (tiles, ids, page.results), *_buttons(page.more, csv, sent))

            def next_page(name, query, so_far, *values):
                *values, sent = values
                tiles, ids, results = so_far
                more_tiles, _, more_ids, page = find(name, query, None, *values, offset=len(results))
                tiles, ids, results = tiles + more_tiles, ids + more_ids, results + page.results
                return (tiles, f"{len(tiles)} results", ids, (tiles, ids, results),
                        *_buttons(page.more, apps[name].csv_file(results), sent))

            outputs = [gallery, status, last_results, shown, more, download, buttons]
            inputs = [collection, query, *settings, buttons]  # a state: the page sends null, Gradio the session's
            search.click(_unqueued(first_page, inputs, outputs, status), inputs, outputs, **PAGE_EVENT)
            query.submit(_unqueued(first_page, inputs, outputs, status), inputs, outputs, **PAGE_EVENT)
            inputs = [collection, query, shown, *settings, buttons]
            more.click(_unqueued(next_page, inputs, outputs, status), inputs, outputs, **PAGE_EVENT)
            # the named endpoints keep their signatures (+ the collection, last) for gradio_client, and their
            # file-served tiles (gradio_client downloads files; the page's own galleries carry theirs inline)
            gr.Button(visible=False).click(lambda query, k, min_score, name: apps[name].text_to_image(query, k, min_score)[:2],
                                           [query, k, min_score, collection], _api_outputs(), api_name="text_to_image")
        with gr.Tab("Image -> text"):
            image_in = _image_input("i2t-image")
            k_text = gr.Slider(1, 20, value=5, step=1, label="k")
            find_texts = gr.Button("Find texts", variant="primary", elem_id="i2t-search")
            status_t = gr.Markdown(elem_id="i2t-status")
            texts = gr.Dataframe(headers=["rank", "score", "text"], label="Texts", elem_id="i2t-texts")
            inputs, outputs = [image_in, k_text, collection], [texts, status_t]
            find_texts.click(_unqueued(lambda image, k, name: (apps[name].image_to_text(image, k), ""), inputs, outputs,
                                       status_t), inputs, outputs, **PAGE_EVENT)
            gr.Button(visible=False).click(lambda image, k, name: apps[name].image_to_text(image, k),
                                           [image_in, k_text, collection], gr.Dataframe(visible=False),
                                           api_name="image_to_text")
        with gr.Tab("Image -> image"):
            image_q = _image_input("i2i-image")
            refine = gr.Textbox(label="Refine with text (optional, same language: + 2:at night - people)",
                                elem_id="i2i-refine")
            find_similar = gr.Button("Find similar", variant="primary", elem_id="i2i-search")
            status_i = gr.Markdown(elem_id="i2i-status")
            original = gr.Markdown(elem_id="i2i-original")
            gallery_i = inline_gallery(label="Similar images", columns=6, height="auto", elem_id="i2i-gallery")
            last_similar = gr.State([])

            def similar(name, image, text, *values):
                tiles, status_line, ids, _ = find(name, _without_leading_plus(text), image, *values)
                return tiles, status_line, ids

            inputs, outputs = [collection, image_q, refine, *settings], [gallery_i, status_i, last_similar]
            find_similar.click(_unqueued(similar, inputs, outputs, status_i), inputs, outputs, **PAGE_EVENT)
            gr.Button(visible=False).click(lambda image, k, min_score, name: apps[name].image_to_image(image, k, min_score)[:2],
                                           [image_q, k, min_score, collection], _api_outputs(), api_name="image_to_image")
        with gr.Tab("Evaluation"):
            gr.Markdown(report_markdown(report))
            plots = report_plots(report)
            if plots:
                gr.Gallery(value=plots, label="Plots", columns=2)

        def search_by_result(name, ids, k, min_score, under, glob, label, where, after, before, orientation, order,
                             collapse, evt: gr.SelectData):
            """Clicking a result searches by it and links its original; only images the index lists are opened."""
            app = apps[name]
            item = ids[evt.index] if ids and 0 <= evt.index < len(ids) else None
            source = app.searcher.indexed_image(item) if item is not None else None
            if source is None:
                raise gr.Error("that result is no longer in the index")
            try:
                picture = thumbnail(source)
            except ImageDecodeError as exc:
                raise gr.Error(str(exc)) from None
            link = f"[Open the original]({ORIGINAL_ROUTE.format(item_id=item).lstrip('/')}) · {Path(source).name}"
            tiles, status_line, found, _ = find(name, None, source, k, min_score, under, glob, label, where, after,
                                                before, orientation, order, collapse)
            return picture, tiles, status_line, found, link

        gallery.select(search_by_result, [collection, last_results, *settings],
                       [image_q, gallery_i, status_i, last_similar, original], api_name=False)
    return ui


def _unqueued(fn, inputs: list, outputs: list, status: gr.Markdown):
    """A search of the page as an unqueued event (PAGE_EVENT): `fn` with its inputs checked and converted by
    their components' own `preprocess`, and its outputs by their `postprocess`, in the calling thread (Gradio
    would run each in a worker thread of its own: 13 thread hops for a text search's inputs, ~2 ms at one user,
    and 3 more for its outputs, ~0.5 ms), and a gr.Error shown in the status line, the other outputs left as
    they were (Gradio's page shows an unqueued event's error as a bare "Error")."""
    def run(*payloads):
        try:
            values = fn(*(_preprocessed(c, payload) for c, payload in zip(inputs, payloads)))
        except gr.Error as exc:
            values = [f"**Error:** {exc.message}" if o is status else gr.skip() for o in outputs]
        return [_postprocessed(o, value) for o, value in zip(outputs, values)]

    run.__name__ = fn.__name__
    return run


def _preprocessed(component, payload):
    """What Gradio's `Blocks.preprocess_data` hands a function, without its thread hop: a state's value as it is;
    a file payload (an upload, already checked to be in Gradio's upload folder) validated into the component's
    data model; then the component's own `preprocess`, its failures as gr.Error naming the input."""
    if component.stateful:
        return payload
    try:
        if component.data_model is not None and payload is not None:
            payload = component.data_model.model_validate(payload, context={"validate_meta": True})
        return component.preprocess(payload)
    except gr.Error:
        raise
    except Exception as exc:  # e.g. an upload PIL cannot read: a one-line error naming the input
        raise gr.Error(f"{component.label or 'input'}: {exc}") from None


def _postprocessed(component, value):
    """What Gradio's `Blocks.postprocess_data` makes of an output before it serializes it, without its thread
    hop: a state's value, and a property update (`gr.update`, `gr.skip`), as they are, an update's new value
    through the component's `postprocess`; any other value through `postprocess`, as plain data."""
    if component.stateful:
        return value
    if is_prop_update(value):
        return {**value, "value": _postprocessed(component, value["value"])} if "value" in value else value
    value = component.postprocess(value)
    return value.model_dump() if isinstance(value, GradioModel | GradioRootModel) else value


def _buttons(more: bool, csv: str | None, sent: tuple[bool, bool]) -> tuple:
    """The "more results" and CSV buttons' outputs after a search, and what the page then shows. A button's
    visibility is updated only when it changes: Gradio builds a new component and its config for every
    `gr.update` (the server's handling of a text search at one user 10.8 -> 8.7 ms without the two, timed
    inside `otclip serve`); a CSV for a button already shown is sent as its plain value."""
    more_was, csv_was = sent
    more_out = gr.skip() if more == more_was else gr.update(visible=more)
    if (csv is not None) == csv_was:
        csv_out = csv if csv_was else gr.skip()
    else:
        csv_out = gr.update(value=csv, visible=csv is not None)
    return more_out, csv_out, (more, csv is not None)


def _examples(query: gr.Textbox, queries: list[str]) -> gr.Dataset:
    """The collection's example queries (`SearchApp.examples`) as a row of samples that fill the query box; also the
    update that shows another collection's (the picker's change)."""
    return gr.Dataset(components=[query], samples=[[q] for q in queries], label="Examples", visible=bool(queries),
                      elem_id="examples")


def _api_outputs() -> list:
    """A named endpoint's outputs (tiles served as files, status line): hidden, the page never shows them."""
    return [gr.Gallery(visible=False, format="jpeg"), gr.Markdown(visible=False)]


def _without_leading_plus(text: str | None) -> str | None:
    """"+ at night" refines an image: the leading sign joins the text to the image term."""
    text = (text or "").strip()
    return text[1:].strip() if text.startswith("+") else text or None
