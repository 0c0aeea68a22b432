"""clpipe: the DICOM sync step of the clpipe MRI pipeline."""

__version__ = "0.1.0"
