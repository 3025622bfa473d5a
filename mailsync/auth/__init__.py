"""Signing in to Microsoft (or the local Graph sandbox) through MSAL.

``sandbox_routing`` lets the unchanged MSAL code path run against the Graph
sandbox: MSAL keeps the real authority (it refuses ``http://`` authorities)
and talks through an HTTP client that routes Microsoft's hosts to the sandbox.
"""
