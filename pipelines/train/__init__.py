"""Training with Ray Train (DDP): configs, the per-worker loop, and the driver that runs and exports a run."""
