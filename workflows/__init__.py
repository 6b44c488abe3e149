"""Ray orchestration: one module per step, each with ``run(config) -> result`` and a CLI entry."""

import os

# Train V2 is Ray 2.60's default; say so explicitly so a user's environment cannot silently select V1.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
