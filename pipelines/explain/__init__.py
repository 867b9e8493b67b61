"""Where a score comes from: tile-attention overlays of images (``spai explain``, and evaluate's report)."""
