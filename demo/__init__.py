"""The embedded demo (make demo): digits data, a classifier feature extractor, the runner."""
