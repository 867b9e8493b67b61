"""Ray jobs around ``spai_core``: the data they read, the jobs themselves, and the infrastructure under both.

- ``infra``: storage (local and ``s3://``), the Ray runtime, MLflow tracking, console output.
- ``data``: manifests, image decoding, Ray Data datasets, transforms, the validation job.
- ``train``, ``score``, ``evaluate``: the jobs.
- ``demo``: the offline demo corpus and the demo run.
"""
