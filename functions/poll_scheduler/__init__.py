"""poll_scheduler blueprint (to be filled by its issue)."""

import azure.functions as func

bp = func.Blueprint()
