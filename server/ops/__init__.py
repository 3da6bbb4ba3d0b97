"""Operations routes and plumbing: /health, /ready, /metrics, API-key auth."""
