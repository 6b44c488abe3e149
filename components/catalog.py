"""Where each step's output lives below a storage root, and the model catalog (versions and aliases).

::

    <root>/datasets/<name>/manifest.parquet        ingest
    <root>/synthetic/<name>/                        synthesize
    <root>/features/<backbone>/<dataset>/           features
    <root>/runs/<run>/                              Ray Train / Tune run storage, checkpoints
    <root>/models/<name>/<version>/                 artifacts (model.safetensors, detector.json, metrics.json)
    <root>/models/<name>/aliases.json               {"production": "3", ...}
    <root>/reports/<name>/                          evaluation/sweep reports, sheets, plots

Not to be confused with :mod:`components.models.registry`, which maps model *family* names to classes.

Every name that becomes part of a path (dataset, run, model, alias) is checked here, so a name like
``../../escaped`` can never write outside the root. A version number is claimed with a create-only write
(:func:`components.storage.create_only`), so concurrent registrations of one model never share a version.
"""

from __future__ import annotations

import json
import re

from components import storage
from components.errors import ConfigError, StorageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit (no '/')"
CLAIM = "_version.json"  # the create-only claim of a version folder
MAX_CLAIM_TRIES = 1000


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is safe as one path component, else a ConfigError naming the rule."""
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 200:
        raise ConfigError(f"invalid {what} {name!r}", f"use {NAME_RULE}")
    return name


class Layout:
    """Paths of every step's output below one root URI (local folder or S3 prefix), and the model catalog."""

    def __init__(self, root: str):
        self.root = storage.normalize(root)

    def _join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def dataset(self, name: str) -> str:
        return self._join("datasets", check_name(name, "dataset name"))

    def manifest(self, name: str) -> str:
        return storage.join(self.dataset(name), "manifest.parquet")

    def synthetic(self, name: str) -> str:
        return self._join("synthetic", check_name(name, "synthetic set name"))

    def features(self, backbone: str, dataset: str) -> str:
        return self._join("features", check_name(backbone, "backbone name"), check_name(dataset, "dataset name"))

    def runs(self) -> str:
        return self._join("runs")

    def run(self, name: str) -> str:
        return self._join("runs", check_name(name, "run name"))

    def models(self, name: str) -> str:
        return self._join("models", check_name(name, "model name"))

    def model(self, name: str, version: str) -> str:
        return storage.join(self.models(name), check_name(str(version), "model version"))

    def reports(self, name: str) -> str:
        return self._join("reports", check_name(name, "report name"))

    # ---- catalog

    def versions(self, name: str) -> list[str]:
        """Complete versions of a model (their detector.json exists), oldest first."""
        done = [v for v in self._version_dirs(name)
                if storage.exists(storage.join(self.model(name, v), "detector.json"))]
        return sorted(done, key=int)

    def _version_dirs(self, name: str) -> list[str]:
        return [storage.basename(c) for c in storage.listdir(self.models(name)) if storage.basename(c).isdigit()]

    def claim_version(self, name: str) -> str:
        """A new version number of ``name``, claimed for this caller alone (create-only; retried on conflict)."""
        start = max((int(v) for v in self._version_dirs(name)), default=0) + 1
        for version in range(start, start + MAX_CLAIM_TRIES):
            claim = storage.join(self.model(name, str(version)), CLAIM)
            if storage.create_only(claim, json.dumps({"version": version}).encode()):
                return str(version)
        raise StorageError(f"could not claim a version of model {name} after {MAX_CLAIM_TRIES} tries",
                           "too many concurrent registrations; retry")

    def aliases(self, name: str) -> dict[str, str]:
        uri = storage.join(self.models(name), "aliases.json")
        return storage.read_json(uri) if storage.exists(uri) else {}

    def set_alias(self, name: str, alias: str, version: str) -> None:
        check_name(alias, "alias")
        if str(version) not in self.versions(name):
            raise StorageError(f"model {name} has no version {version}",
                               f"registered versions: {self.versions(name) or 'none'}")
        aliases = self.aliases(name)
        aliases[alias] = str(version)
        storage.write_json(storage.join(self.models(name), "aliases.json"), aliases)


def resolve_model(uri: str) -> str:
    """Resolve a model reference to the URI of an artifact directory holding ``detector.json``.

    Accepted forms: an artifact directory; ``<root>/models/<name>`` (alias "production" if set, else the newest
    version); ``<root>/models/<name>@<alias or version>``.
    """
    ref = str(uri)
    selector = None
    if "@" in ref.rsplit("/", 1)[-1]:
        ref, selector = ref.rsplit("@", 1)
    ref = storage.normalize(ref)
    if selector is None and storage.exists(storage.join(ref, "detector.json")):
        return ref
    models_dir, name = storage.parent(ref), storage.basename(ref)
    if not NAME_RE.match(name):
        raise StorageError(f"no model artifact at {uri}",
                           "pass an artifact folder (with detector.json) or <root>/models/<name>[@alias|@version]")
    layout = Layout(storage.parent(models_dir))
    versions = layout.versions(name)
    if not versions:
        raise StorageError(f"no model artifact at {uri}",
                           "pass an artifact folder (with detector.json) or <root>/models/<name>[@alias|@version]")
    aliases = layout.aliases(name)
    if selector is None:
        version = aliases.get("production", versions[-1])
    elif selector in aliases:
        version = aliases[selector]
    elif selector == "latest":
        version = versions[-1]
    elif selector in versions:
        version = selector
    else:
        raise StorageError(f"model {name} has no alias or version {selector!r}",
                           f"versions: {versions}; aliases: {sorted(aliases) or 'none'}")
    return layout.model(name, version)
