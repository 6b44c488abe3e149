"""Model families. Each folder holds a pure nn.Module (model.py), its loss (loss.py) and a Detector wrapper."""
