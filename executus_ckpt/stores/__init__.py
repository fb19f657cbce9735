"""Checkpoint stores: in-memory (reference semantics) and SQL (SQLite, PostgreSQL)."""
