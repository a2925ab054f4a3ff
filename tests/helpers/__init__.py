"""Helpers the test modules share (the fixtures live in tests/conftest.py)."""
