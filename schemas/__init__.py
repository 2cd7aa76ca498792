"""Pydantic v2 models of the moebuild spec language."""
