"""Durable responses: create, run, follow and take over responses in the journal; no HTTP in here."""
