"""Alembic migrations of the service database (run by Database on open)."""
