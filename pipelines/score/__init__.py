"""Batch scoring with Ray Data: read -> decode -> score on an actor pool -> write, resumable."""
