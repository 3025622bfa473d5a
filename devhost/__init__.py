"""devhost: a local Azure Functions host for function_app.py (``func start`` cannot run here).

``python -m devhost`` serves the app's HTTP triggers at
http://127.0.0.1:7071/api/<route>, runs its queue triggers against Azurite
and its timers, writes its queue and SignalR output bindings, emulates
Azure SignalR Service (serverless) under /signalr, and serves static_web/
at /. ``python -m devhost.stack`` starts the local services first
(Azurite, the search store, the Graph sandbox). See docs/devhost.md.
"""

from devhost.host import Devhost, DevhostOptions, DevhostThread

__all__ = ["Devhost", "DevhostOptions", "DevhostThread"]
