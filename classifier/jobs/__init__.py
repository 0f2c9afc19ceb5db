"""Asynchronous jobs: the durable store (SQLite or PostgreSQL), the worker that classifies stored images, webhooks."""
