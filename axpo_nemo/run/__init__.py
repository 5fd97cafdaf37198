"""Run infrastructure every backend and every command shares (no model, no backend imports)."""
