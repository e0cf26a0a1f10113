"""Ephemeral Vault/OpenBao secrets, leased per task.

    kinds.py      the ``vault-*`` credential kinds a policy rule names, and their token-type URNs
    settings.py   VaultSettings (address, the broker's own identity, mounts)
    errors.py     VaultUnavailable (503), VaultRefused (403) and the one hvac exception choke point
    identity.py   VaultIdentity: the broker's own Vault token (AppRole or token file), renewed
    minter.py     VaultMinter: dynamic DB users, child tokens, wrapped secrets; lease revocation
    leases.py     LeaseBook: the leases the broker handed out (SQLite), for release and sweeping
    issuer.py     VaultIssuer: mint -> ledger -> respond, revoke on failure, release, sweep
    devserver.py  a local ``bao server -dev`` configured for the sample policies (trials and tests)

Only ``kinds`` is imported by the policy loader; the rest is loaded when Vault is configured.
"""
