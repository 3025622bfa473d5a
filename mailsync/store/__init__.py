"""The search store: where synced mail lives and what the email client reads.

``mappings`` names the indices and declares their mappings, ``documents``
turns domain records into documents and back (pure, no client), and
``elasticsearch`` is the adapter implementing ``mailsync.ports.MessageStore``
— the only module here that imports the Elasticsearch client. See
docs/store.md for the index design.
"""
