# A task policy for child tokens (rule kb-config-token): read the knowledge-base configuration only.
path "kv/data/kb/config" {
  capabilities = ["read"]
}
