"""GET /api/health: the state of each dependency (tables, queues, store); 200 if all are up, else 503.

Anonymous on purpose (load balancers and ``make run`` probe it); it reveals
only up/down, latency and an error class per dependency.
"""

import azure.functions as func

from functions._shared.http import handle_errors, json_response
from functions._shared.runtime import runtime
from mailsync.health import check_health

bp = func.Blueprint()


@bp.function_name("health")
@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@handle_errors
def health(req: func.HttpRequest) -> func.HttpResponse:
    report = check_health(runtime().settings)
    return json_response(report.as_dict(), 200 if report.healthy else 503)
