"""The Function App: the one file the Azure Functions host (and devhost) indexes.

Each folder under ``functions/`` holds one Blueprint; they are registered
here and nowhere else.
"""

import azure.functions as func

from functions.account_api import bp as account_api
from functions.graph_webhook import bp as graph_webhook
from functions.health import bp as health
from functions.mail_api import bp as mail_api
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
    signalr_negotiate,
    mail_api,
    health,
):
    app.register_functions(blueprint)
