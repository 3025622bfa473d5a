"""Start and stop the real local services: Azurite, the search node (OpenSearch) or store (osmem), the Graph sandbox.

Shared by ``python -m devhost.stack`` (``make run``), the test fixtures and
the benchmarks, so every one of them starts a service the same way.
"""
