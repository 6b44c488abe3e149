"""Model families. Each folder holds a pure nn.Module (model.py), its loss (loss.py) and a Detector wrapper.

Importing this package registers every built-in family with :mod:`components.models.registry` (which imports
none of them, so the dependency runs one way: family -> registry).
"""

from components.models import gmbinet, supersimplenet

__all__ = ["gmbinet", "supersimplenet"]
