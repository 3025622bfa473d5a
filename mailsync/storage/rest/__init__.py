"""Azure Storage (Tables, Queues) through its REST API, without the SDK's pipeline on every call.

Why: profiled on the change path (``bench/change_latency.py``, 2026-12-02) a
single Storage call cost ~1.6-2.4 ms of CPU through azure-core's policy
chain and ``requests`` (session merging, urllib3's pool, ``http.client``'s
header parser, the generated (de)serialisers), and a change makes ~5 table
and ~2 queue calls. The same call here is one signed request on a
keep-alive connection: ~0.1-0.2 ms (docs/scaling.md, "CPU per change").

* ``mailsync.keepalive_http`` (shared with the Graph client): one keep-alive
  HTTP/1.1 connections per origin, shared by the threads.
* :mod:`.auth`: the account from a connection string or an identity, and
  each request's authorization (Shared Key, SAS, a bearer token).
* :mod:`.retry`: retries and their back-off, as the SDK clients were configured.
* :mod:`.errors`: an answer's failure as the azure-core exception the SDK
  raises for it, so the adapters' mapping to ``mailsync.errors`` stays one.
* :mod:`.table`, :mod:`.queue`: the calls this project makes.
"""
