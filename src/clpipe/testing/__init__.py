"""Test helpers shipped with clpipe: a local Flywheel-compatible server with demo DICOM data.

Used by the test suite and by the no-account demo; nothing here talks to a real Flywheel site.
"""
