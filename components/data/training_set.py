"""The rows a training run sees: the supervision regime applied to the manifest, synthetic samples mixed in, the
family's needs (a segmenter trains on pixel-supervised rows only), an optional cap. Plain pyarrow; deterministic
from ids and the seed, so re-running a config sees the same rows.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from components.data import manifest, regimes
from components.errors import DataError

log = logging.getLogger(__name__)


def _take_by_hash(table: pa.Table, n: int, seed: int) -> pa.Table:
    """``n`` rows chosen by a seeded hash of their ids (order-independent), kept in table order."""
    order = sorted(range(table.num_rows), key=lambda i: manifest.unit_hash(table["sample_id"][i].as_py(), seed))
    return table.take(pa.array(sorted(order[:n])))


def mix_synthetic(table: pa.Table, source: str, count: int, seed: int) -> pa.Table:
    """``count`` synthetic rows of a ``defectflow synthesize`` output added to the train split."""
    syn = manifest.read(source)
    syn = syn.filter(pc.equal(syn["source"], "synthetic"))
    if syn.num_rows < count:
        raise DataError(f"{source} holds {syn.num_rows} synthetic rows, {count} requested",
                        "lower data.synthetic.count or synthesize more")
    syn = _take_by_hash(syn, count, seed)
    syn = manifest.validate(syn.set_column(syn.schema.get_field_index("split"), "split",
                                           pa.array(["train"] * syn.num_rows)))
    log.info("adding %d synthetic training samples from %s", count, source)
    return pa.concat_tables([table, syn])


def training_table(full: pa.Table, *, regime: str, mixed_masks: int | float | None = None, seed: int = 0,
                   synthetic_source: str | None = None, synthetic_count: int = 0, needs_masks: bool = False,
                   max_train_samples: int | None = None, family: str = "the model") -> pa.Table:
    """The manifest as a trainer sees it: train rows filtered as above, val/test rows as they are."""
    table = regimes.apply(full, regime, mixed_masks=mixed_masks, seed=seed)
    if synthetic_source and synthetic_count > 0:
        table = mix_synthetic(table, synthetic_source, synthetic_count, seed)
    train = table.filter(pc.equal(table["split"], "train"))
    if needs_masks:
        usable = pc.equal(train["supervision"], "pixel")
        dropped = train.num_rows - int(pc.sum(usable).as_py() or 0)
        if dropped:
            log.info("%s trains on pixel-supervised rows only: %d of %d train rows have no usable mask", family,
                     dropped, train.num_rows)
        train = train.filter(usable)
    if max_train_samples and train.num_rows > max_train_samples:
        train = _take_by_hash(train, max_train_samples, seed)
    if train.num_rows == 0:
        raise DataError(f"no training rows left after regime {regime!r}" + (" and the mask filter" if needs_masks
                                                                              else ""),
                        f"{family} needs pixel masks in the train split; check the manifest and data.regime"
                        if needs_masks else "check the manifest's train split and data.regime")
    rest = table.filter(pc.not_equal(table["split"], "train"))
    return pa.concat_tables([train, rest])
