"""The search store: where synced mail lives and what the email client reads.

``mappings`` names the indices and declares their mappings, ``documents``
turns domain records into documents and back (pure, no client),
``search_store`` implements ``mailsync.ports.MessageStore`` once for every
engine, on the seam ``engine`` declares, and ``engines/`` holds one small
module per engine — the only modules that import a search client
(``opensearch.py``: opensearch-py; ``elasticsearch.py``: elasticsearch).
See docs/store.md for the index design.
"""
