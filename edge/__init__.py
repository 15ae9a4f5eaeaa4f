"""Edge agent: polls field devices, buffers every reading durably, forwards batches to the hub."""

__version__ = "0.1.0"
