"""The Function App: the one file the Azure Functions host (and devhost) indexes.

Each folder under ``functions/`` holds one Blueprint; they are registered
here and nowhere else.
"""

import gc

import azure.functions as func

from functions.account_api import bp as account_api
from functions.graph_webhook import bp as graph_webhook
from functions.health import bp as health
from functions.mail_api import bp as mail_api
from functions.maintenance import bp as maintenance
from functions.message_api import bp as message_api
from functions.oauth_callback import bp as oauth_callback
from functions.oauth_start import bp as oauth_start
from functions.poll_scheduler import bp as poll_scheduler
from functions.signalr_negotiate import bp as signalr_negotiate
from functions.subscription_renewer import bp as subscription_renewer
from functions.sync_worker import bp as sync_worker

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

for blueprint in (
    oauth_start,
    oauth_callback,
    account_api,
    sync_worker,
    graph_webhook,
    subscription_renewer,
    poll_scheduler,
    maintenance,
    signalr_negotiate,
    mail_api,
    message_api,
    health,
):
    app.register_functions(blueprint)

# Garbage collection, tuned for the sync worker. An initial sync allocates
# ~35 container objects per message (Graph JSON, records, store documents)
# that live for one page and die by reference counting; at CPython's default
# gen-0 threshold (700) most of them survive a collection or two, are promoted
# and then paid for again by full collections of the whole heap: ~20 us per
# message of bench/pipeline.py's engine CPU (gc callbacks: 674 / 61 / 5
# collections, 0.55 s for 27k messages). A 50,000 threshold lets a page's
# objects die young; freezing what the imports built (modules, SDK clients'
# classes) keeps it out of every full collection. Cycles are still collected.
gc.freeze()
gc.set_threshold(50_000, 10, 10)
