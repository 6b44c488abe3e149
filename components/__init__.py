"""defectflow's library: plain Python + torch, no Ray imports."""

__version__ = "0.1.0"
