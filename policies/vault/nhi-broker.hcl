# The broker's own Vault policy: the least it needs to mint, shorten and revoke task secrets.
# Written by `nhi-broker dev vault` as policy "nhi-broker"; see docs/vault.md.

# Dynamic database users: one Vault role per intent; the intent policy chooses which.
path "database/creds/*" {
  capabilities = ["read"]
}

# Row-scoped database users (rule kind vault-db:<role>;rows=<key>): read the operator's base role and
# write its scoped copies, scoped-<role>-<digest>, whose creation statements also record the user's scope
# in nhi.row_scope (docs/vault.md). Only these five role fields; nothing else under database/roles.
path "database/roles/*" {
  capabilities = ["read"]
}
path "database/roles/scoped-*" {
  capabilities = ["create", "update", "read"]
  allowed_parameters = {
    "db_name"               = []
    "creation_statements"   = []
    "revocation_statements" = []
    "default_ttl"           = []
    "max_ttl"               = []
  }
}

# Shorten a database lease to the rule's TTL, and end it (release, expiry sweep, failed ledger append).
# Only database leases: the broker cannot renew or revoke anyone else's.
path "sys/leases/renew/database/creds/*" {
  capabilities = ["update"]
}
path "sys/leases/revoke/database/creds/*" {
  capabilities = ["update"]
}

# Child tokens only through this token role: its allowed_policies bound what the broker can hand out,
# and the broker needs none of those policies itself.
path "auth/token/create/nhi-broker-task" {
  capabilities = ["update"]
}

# End a child token or an unused wrapping token early, by accessor (never by token).
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}

# KV secrets, response-wrapped only: a read without X-Vault-Wrap-TTL (or above 60 s) is refused,
# so the broker never sees the secret, only a single-use wrapping token.
path "kv/data/support/*" {
  capabilities = ["read"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "60s"
}
