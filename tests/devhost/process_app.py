"""The sample app as a module-level ``app``, for ``python -m devhost --app tests.devhost.process_app``."""

from tests.devhost.sample_app import Recorder, make_app

app = make_app(Recorder())
