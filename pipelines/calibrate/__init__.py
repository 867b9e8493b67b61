"""Decision thresholds calibrated on a held-out split and kept in the checkpoint (``spai calibrate``)."""
