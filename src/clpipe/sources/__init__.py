"""Remote sources of DICOM data, one module per kind (Flywheel for now)."""
