"""FastAPI pieces both APIs share: app state, errors, API-key tenants, dependencies, common schemas."""
