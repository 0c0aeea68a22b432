"""Batch jobs: a job as data, and the executors that run it."""
