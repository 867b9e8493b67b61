"""Evaluation of scored tables: metrics per generator, ROC plots, reports, MLflow logging."""
