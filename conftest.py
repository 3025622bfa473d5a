"""Root conftest: the real-service fixtures, one plugin module per service."""

pytest_plugins = [
    "tests.fixtures.azurite",
    "tests.fixtures.search_store",
    "tests.fixtures.graph_sandbox",
    "tests.fixtures.dovecot",       # before devhost, which imports it
    "tests.fixtures.devhost",
    "tests.fixtures.browser",
]
