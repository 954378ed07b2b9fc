"""`otclip check` and `otclip repair`: what is damaged in an index directory, and rebuilding what survives allows.

What can be rebuilt, and from what:
  manifest.json             the model named by the newest kept records file, the chunks' dimension
  metadata.sqlite           the kept records files, replayed in order (embeddings/records/)
  a records file            the metadata store's rows
  {side}-{gen}.faiss, .ids.npy, .vectors.npy   the embedding chunks (`IndexDirectory.publish`)
What cannot: an embedding chunk's vectors. `otclip index` / `index-texts` embed its items again.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import IndexDirectoryError, NewerIndexFormatError
from .images import THUMBNAIL_SIDE, ImageDecodeError, load_image, thumbnail_jpeg
from .index_directory import IndexDirectory
from .metadata_store import SIDES


@dataclass
class Problem:
    what: str  # names the file and what is wrong with it
    fix: str  # the command that repairs it

    def line(self) -> str:
        return f"{self.what}; fix: {self.fix}"


def find_problems(directory: IndexDirectory) -> list[Problem]:
    """Every damaged or missing file of the index directory, each with the command that repairs it."""
    repair = f"otclip repair {directory.root}"
    try:
        manifest = directory.manifest()
    except NewerIndexFormatError:
        raise  # not damaged: a newer otclip's
    except IndexDirectoryError as exc:
        if not directory.exists() and not any(directory.embeddings_dir.glob("*.npy")):
            raise  # not an index at all
        return [Problem(str(exc).split(";")[0], repair)]
    store_problem = directory.store_problem()
    if store_problem:
        return [Problem(store_problem.split(";")[0], repair)]
    lost = "(the rows it wrote could not be rebuilt if metadata.sqlite were lost)"
    problems = [Problem(f"{directory.records_dir / name}.json: missing {lost}", repair)
                for name in sorted(directory.missing_records())]
    problems += [Problem(f"{path}: unreadable {lost}", repair) for path in sorted(directory.records.unreadable())]
    reembed = f"otclip index SOURCE --out {directory.root} (and index-texts for texts)"
    for shard, reason in directory.damaged_chunks().items():
        held = ", ".join(f"{len(keys)} {side}" for side, keys in directory.store.keys_in_shards([shard]).items())
        problems.append(Problem(f"{directory.embeddings_dir / shard}.npy: {reason} (holds {held})", reembed))
    for side in manifest["sides"]:
        try:
            loaded = directory.load_side(side, use_gpu=False)
        except IndexDirectoryError as exc:
            problems.append(Problem(str(exc).split(";")[0], repair))
            continue
        if loaded is not None and loaded.vectors is None:
            problems.append(Problem(f"{directory.side_file(side, '.vectors.npy')}: missing (filtered searches score "
                                    "from the embedding chunks meanwhile, slower)", repair))
    thumbnails = directory.damaged_thumbnails()
    if thumbnails:
        first = directory.thumbnail_path(next(iter(thumbnails)))
        problems.append(Problem(f"{first}: missing or cut short ({len(thumbnails)} thumbnail(s) in all)", repair))
    for tower in ("text", "image"):
        if ((directory.query_dir / f"{tower}.json").exists() and directory.query_model_files(tower) is None
                and directory.query_model_refused(tower) is None):
            problems.append(Problem(f"{directory.query_dir}: {tower}-tower export incomplete or of another model "
                                    f"({tower} queries load torch meanwhile)", f"otclip index SOURCE --out {directory.root}"))
    return problems


def repair(directory: IndexDirectory, factory: str | None = None) -> list[str]:
    """Rebuild, under the writer lock, every file that can be rebuilt; returns one line per thing done.
    Damaged embedding chunks are reported, not repaired: their items must be embedded again."""
    done: list[str] = []
    with directory.writing():
        rebuild: set[str] = set()  # the sides whose FAISS index is built again
        try:
            directory.manifest()
        except NewerIndexFormatError:
            raise
        except IndexDirectoryError:
            model = directory.rebuild_manifest()
            done.append(f"{directory.manifest_path}: written again (model {model['name']})")
            rebuild |= set(SIDES)
        if directory.store_problem():
            counts = directory.rebuild_store()
            held = ", ".join(f"{n} {side}" for side, n in counts["items"].items() if n)
            done.append(f"{directory.store_path}: rebuilt from {counts['replayed']} records files ({held or 'empty'})"
                        + (f"; unreadable, skipped: {', '.join(counts['unreadable'])}" if counts["unreadable"] else ""))
            rebuild |= set(SIDES)  # new item ids: every side is built again
        lost, unreadable = directory.missing_records(), directory.records.unreadable()
        directory.ingest_pending()  # commits a killed run's chunks
        if lost or unreadable:
            written = directory.rewrite_records()
            done.append(f"{directory.records_dir}: {len(lost) + len(unreadable)} lost or unreadable records file(s); "
                        f"every one replaced by {written} file(s) of the current rows")
        sides = directory.manifest()["sides"]
        rebuild |= {side for side in sides if not _loads(directory, side)}
        for side in sorted(rebuild):
            if side in sides or directory.store.count(side):
                built = directory.publish(side, factory or sides.get(side, {}).get("factory", "auto"))
                done.append(f"{side}: FAISS index built again ({built['items']} items, {built['factory']})")
        thumbnails = directory.damaged_thumbnails()
        if thumbnails:
            done.append(f"{directory.thumbnails_dir}: {_make_thumbnails(directory, thumbnails)} of "
                        f"{len(thumbnails)} missing or cut-short thumbnail(s) made again from the originals")
        damaged = directory.damaged_chunks()
        if damaged:
            done.append(f"{len(damaged)} damaged embedding chunk(s) left: run `otclip index SOURCE --out "
                        f"{directory.root}` (and index-texts for texts) to embed their items again")
    return done


def _loads(directory: IndexDirectory, side: str) -> bool:
    """Whether the side's published files load whole (its vectors file included)."""
    try:
        loaded = directory.load_side(side, use_gpu=False)
    except IndexDirectoryError:
        return False
    return loaded is None or loaded.vectors is not None


def _make_thumbnails(directory: IndexDirectory, wanted: dict[str, str]) -> int:
    """Thumbnails made again from the indexed originals (sha256 -> path); an original gone since is skipped."""
    made = 0
    for sha256, path in wanted.items():
        try:
            directory.write_thumbnail(sha256, thumbnail_jpeg(load_image(path, draft=THUMBNAIL_SIDE)), replace=True)
            made += 1
        except ImageDecodeError:
            continue
    return made
