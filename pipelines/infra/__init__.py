"""Infrastructure every job uses: storage (local and s3://), the Ray runtime, MLflow tracking, console output."""
