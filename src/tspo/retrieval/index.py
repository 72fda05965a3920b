"""Build an index folder from a corpus jsonl file, and load any index folder as a `Retriever`.

An index folder holds the backend's files, ``documents.jsonl`` and ``manifest.json``. The build
writes into a hidden sibling folder and renames it into place at the end, and the manifest (written
last) lists every file with its size and SHA-256, so a half-written, damaged or tampered folder is
refused on load, even when the damage keeps a file's size.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tspo.errors import TSPOError
from tspo.retrieval.base import Retriever
from tspo.retrieval.dense import ChunkCallback, DenseBuildOptions, FaissSettings
from tspo.utils import file_sha256, fsync_tree, progress_bar, write_json

if TYPE_CHECKING:
    from rich.progress import Progress

    from tspo.retrieval.dense import DenseRetriever

FORMAT_VERSION = 1
KINDS = ("bm25", "dense")
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_DIR = "embeddings"


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _prepare_partial(partial: Path) -> None:
    """Empty the build folder, keeping finished embedding chunks so a dense build resumes."""
    partial.mkdir(parents=True, exist_ok=True)
    for entry in partial.iterdir():
        if entry.name == EMBEDDINGS_DIR and entry.is_dir():
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _index_files(folder: Path) -> list[Path]:
    return [
        path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE
    ]


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size for path in _index_files(folder)
    }


def _file_hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in _index_files(folder)}


def _swap_into_place(partial: Path, out_dir: Path) -> None:
    old = out_dir.parent / f".{out_dir.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)


def _build_bm25(
    corpus_path: Path,
    partial: Path,
    progress: Progress,
    *,
    k1: float,
    b: float,
    stemmer: str | None,
) -> int:
    """Stream the corpus into a BM25 index in ``partial``; the number of documents."""
    from tspo.data.corpus import iter_corpus
    from tspo.retrieval.bm25 import build_folder

    step = progress.add_task("BM25 indexing (streaming)", total=1)
    doc_count = build_folder(iter_corpus(corpus_path), partial, k1=k1, b=b, stemmer=stemmer)
    progress.update(step, completed=1)
    return doc_count


def _embed_corpus(
    corpus_path: Path,
    partial: Path,
    progress: Progress,
    options: DenseBuildOptions,
    on_chunk: ChunkCallback | None,
) -> tuple[DenseRetriever, int]:
    """Read the corpus and embed it chunk by chunk (resumable in ``partial``); the retriever and
    the number of documents."""
    from tspo.data.corpus import read_corpus
    from tspo.retrieval.dense import DenseRetriever

    step = progress.add_task("reading corpus", total=None)
    docs = read_corpus(corpus_path)
    progress.update(step, total=1, completed=1)
    step = progress.add_task(f"embedding {len(docs)} documents (chunks)", total=None)

    def report(done: int, total: int, reused: bool) -> None:
        progress.update(step, total=total, completed=done)
        if on_chunk is not None:
            on_chunk(done, total, reused)

    retriever = DenseRetriever.from_docs(
        docs, options=options, work_dir=partial / EMBEDDINGS_DIR, on_chunk=report
    )
    return retriever, len(docs)


def build_index(
    corpus_path: str | Path,
    kind: str,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    encoder: str | None = None,
    query_prefix: str = "",
    passage_prefix: str = "",
    batch_size: int = 64,
    chunk_size: int = 1024,
    stemmer: str | None = None,
    k1: float = 1.5,
    b: float = 0.75,
    on_chunk: ChunkCallback | None = None,
    faiss: FaissSettings | None = None,
) -> Path:
    """Index ``corpus_path`` (corpus jsonl) with ``kind`` (bm25|dense) into ``out_dir``.

    Dense options: ``encoder`` (default all-MiniLM-L6-v2), prefixes, ``batch_size``,
    ``chunk_size`` (passages per saved embedding chunk) and ``faiss`` (the index type and its
    settings, default exact flat). BM25 options: ``stemmer`` (a PyStemmer
    language, off by default), ``k1``, ``b``. Returns ``out_dir``.
    """
    corpus_path, out_dir = Path(corpus_path), Path(out_dir)
    if kind not in KINDS:
        raise TSPOError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not corpus_path.is_file():
        raise TSPOError(f"corpus file not found: {corpus_path}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise TSPOError(f"{out_dir} already exists and is not empty; pass --overwrite to replace")

    started = time.perf_counter()
    partial = _partial_dir(out_dir)
    _prepare_partial(partial)
    with progress_bar(disable=not show_progress) as progress:
        corpus_sha = file_sha256(corpus_path)
        retriever: DenseRetriever | None = None
        if kind == "bm25":  # one streaming pass: the corpus is never held in memory
            doc_count = _build_bm25(corpus_path, partial, progress, k1=k1, b=b, stemmer=stemmer)
            options: dict[str, Any] = {"stemmer": stemmer, "k1": k1, "b": b}
            encoder_name = None
        else:
            dense_options = DenseBuildOptions(
                encoder=encoder,
                query_prefix=query_prefix,
                passage_prefix=passage_prefix,
                batch_size=batch_size,
                chunk_size=chunk_size,
                faiss=faiss or FaissSettings(),
            )
            retriever, doc_count = _embed_corpus(
                corpus_path, partial, progress, dense_options, on_chunk
            )
            options = {
                "query_prefix": query_prefix,
                "passage_prefix": passage_prefix,
                "chunk_size": chunk_size,
                "faiss": retriever.settings.to_json(),
            }
            encoder_name = retriever.encoder.name
        step = progress.add_task("saving index", total=1)
        if retriever is not None:
            retriever.save(partial)
        shutil.rmtree(partial / EMBEDDINGS_DIR, ignore_errors=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "encoder": encoder_name,
            "doc_count": doc_count,
            "corpus_sha256": corpus_sha,
            "corpus_path": str(corpus_path.resolve()),
            "options": options,
            "build_seconds": round(time.perf_counter() - started, 3),
            "files": _file_sizes(partial),
            "sha256": _file_hashes(partial),
        }
        write_json(partial / MANIFEST_FILE, manifest)
        fsync_tree(partial)
        _swap_into_place(partial, out_dir)
        progress.update(step, completed=1)
    return out_dir


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished index; a missing, half-written or foreign folder is refused."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise TSPOError(f"no index folder at {index_dir}")
    path = index_dir / MANIFEST_FILE
    if not path.is_file():
        raise TSPOError(
            f"{index_dir} is not a finished index ({MANIFEST_FILE} is missing; "
            "was the build interrupted?): rebuild it with `tspo index build`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TSPOError(f"{path} is corrupt: {err}") from err
    if not isinstance(manifest, dict):
        raise TSPOError(f"{path} is corrupt: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise TSPOError(
            f"{index_dir} has index format version {version!r}; this tspo reads version "
            f"{FORMAT_VERSION}: rebuild it with `tspo index build`"
        )
    if manifest.get("kind") not in KINDS:
        raise TSPOError(f"{path}: unknown index kind {manifest.get('kind')!r}")
    if not isinstance(manifest.get("files"), dict) or not isinstance(
        manifest.get("doc_count"), int
    ):
        raise TSPOError(f"{path} is corrupt: 'files' or 'doc_count' is missing")
    return manifest


def check_files(index_dir: str | Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Every file the manifest lists is present with its recorded size and SHA-256.

    Manifests written before hashes were recorded (no ``sha256`` key), and every manifest when
    ``hashes`` is False, are checked by size only.
    """
    index_dir = Path(index_dir)
    sha256 = manifest.get("sha256")
    if sha256 is not None and not isinstance(sha256, dict):
        raise TSPOError(f"{index_dir / MANIFEST_FILE} is corrupt: 'sha256' is not an object")
    for name, size in manifest["files"].items():
        path = index_dir / name
        if not path.is_file():
            raise TSPOError(f"index {index_dir} is incomplete: {name} is missing")
        if path.stat().st_size != size:
            raise TSPOError(
                f"index {index_dir} is damaged: {name} has {path.stat().st_size} bytes, "
                f"the manifest says {size}"
            )
        if hashes and sha256 is not None and file_sha256(path) != sha256.get(name):
            raise TSPOError(
                f"index {index_dir} is damaged: {name} does not match the SHA-256 in its manifest"
            )


def load_retriever(
    index_dir: str | Path,
    *,
    corpus_path: str | Path | None = None,
    mmap: bool | None = None,
) -> Retriever:
    """Open the index in ``index_dir`` (built by :func:`build_index`) as a `Retriever`.

    With ``corpus_path``, also check that the index was built from exactly that corpus file.
    ``mmap=True`` memory-maps the index instead of reading it (BM25 arrays and documents; a
    dense index of a type faiss can map); ``None`` follows ``$TSPO_INDEX_MMAP``. A mapped index
    is checked by file sizes only: hashing would read every byte the map exists not to read.
    """
    from tspo.retrieval.bm25 import mmap_default

    index_dir = Path(index_dir)
    mmap = mmap_default(mmap)
    manifest = read_manifest(index_dir)
    check_files(index_dir, manifest, hashes=not mmap)
    if corpus_path is not None and file_sha256(corpus_path) != manifest.get("corpus_sha256"):
        raise TSPOError(f"index {index_dir} was built from a different corpus than {corpus_path}")
    if manifest["kind"] == "bm25":
        from tspo.retrieval.bm25 import BM25Retriever

        retriever: Any = BM25Retriever.load(index_dir, mmap=mmap)
    else:
        from tspo.retrieval.dense import DenseRetriever

        retriever = DenseRetriever.load(index_dir, mmap=mmap)
    if len(retriever) != manifest["doc_count"]:
        raise TSPOError(
            f"index {index_dir} holds {len(retriever)} documents but its manifest says "
            f"{manifest['doc_count']}"
        )
    return retriever


def open_retriever(
    *,
    index: str | Path | None = None,
    url: str | None = None,
    corpus: str | Path | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> Retriever:
    """Exactly one of: an index folder (:func:`load_retriever`), the URL of a running retrieval
    server, or a corpus jsonl file (BM25 built in memory).

    A server is checked at once (``HttpRetriever.check``: reachable, token accepted), so a wrong
    URL or token fails in seconds with one line, before any model is loaded.
    """
    if sum(bool(source) for source in (index, url, corpus)) != 1:
        raise TSPOError("give exactly one retriever: an index folder, a server URL or a corpus")
    if url:
        from tspo.retrieval.client import HttpRetriever

        remote = HttpRetriever(url, token=token, timeout=timeout, retries=retries)
        try:
            remote.check()
        except BaseException:
            remote.close()
            raise
        return remote
    if index:
        return load_retriever(index)
    assert corpus  # the one source left
    from tspo.data.corpus import read_corpus
    from tspo.retrieval.bm25 import BM25Retriever

    return BM25Retriever.from_docs(read_corpus(corpus))
