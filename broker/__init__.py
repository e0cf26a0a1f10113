"""nhi-broker: workload identity and ephemeral credential broker for AI assistants.

Entry points:
- ``broker.api.app.create_app(settings)``: the HTTP service (RFC 8693 token exchange, JWKS, ledger).
- ``broker.pipeline.Broker``: attest -> authorize -> mint -> ledger, without HTTP.
- ``nhi-broker`` (``broker.cli.main``): serve, policy test/explain/lint, keys, dev identity.
"""

__version__ = "0.1.0"
