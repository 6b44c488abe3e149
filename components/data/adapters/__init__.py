"""Dataset adapters: one module per folder layout, each turning a root (local folder or ``s3://`` prefix) into
manifest rows; :func:`scan_dataset` / :func:`ingest` do the shared work.

Importing this package registers every built-in layout (the registry in :mod:`.base` imports none of them).
"""

from components.data.adapters import (
    bsdata,
    crackforest,
    folder,
    kolektorsdd,
    kolektorsdd2,
    magnetic_tile,
    mvtec_ad,
    neu_det,
    procedural,
    sd_saliency_900,
)
from components.data.adapters.base import ADAPTERS, Adapter, AdapterOptions, Unreadable, get, register
from components.data.adapters.ingest import Scan, ingest, scan_dataset

__all__ = ["ADAPTERS", "Adapter", "AdapterOptions", "Scan", "Unreadable", "bsdata", "crackforest", "folder", "get",
           "ingest", "kolektorsdd", "kolektorsdd2", "magnetic_tile", "mvtec_ad", "neu_det", "procedural", "register",
           "scan_dataset", "sd_saliency_900"]
