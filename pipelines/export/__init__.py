"""Exports of trained SPAI models for deployment runtimes (``spai export``)."""
