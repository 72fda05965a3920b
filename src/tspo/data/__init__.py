"""Data: retrieval corpora and QA sets.

- :mod:`tspo.data.corpus`: corpus jsonl (``id``, ``contents`` = "Title\\ntext"), ``CorpusDoc``.
- :mod:`tspo.data.qa`: ``QAExample``; Search-R1 parquet and FlashRAG jsonl readers and writers.
- :mod:`tspo.data.wiki`: the bundled Wikipedia corpus and its generated QA (``tspo data wiki``).
- :mod:`tspo.data.world`: the synthetic search world used by the quickstart.

Submodules are imported on use, so ``import tspo.data`` stays light.
"""
