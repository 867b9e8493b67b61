"""Sem-SPAI feature extraction: both frozen models' features of every image, once, into a Parquet feature table."""
