"""Connecting to Ray, checking resources before asking for them, and logging set-up.

A Train run that asks for more CPUs or GPUs than the cluster has waits forever, so every workflow validates its
request against ``ray.cluster_resources()`` first and raises a ResourceError that says what to change.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from components import storage
from components.config import RayConfig, ScalingSettings, StorageConfig
from components.errors import ResourceError

log = logging.getLogger("defectflow")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not any(getattr(h, "_defectflow", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        h._defectflow = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.WARNING)
    for name in ("defectflow", "components", "workflows", "serve_apps"):
        logging.getLogger(name).setLevel(level)


def init_ray(ray_cfg: RayConfig | None = None, storage_cfg: StorageConfig | None = None) -> None:
    """Start or join Ray once per process.

    Under ``ray job submit`` RAY_ADDRESS is set and we join that cluster; otherwise a local instance starts with the
    configured resources. Storage settings travel to workers as environment variables so tasks that only get a URI
    can still reach a custom S3 endpoint.
    """
    import ray

    ray_cfg = ray_cfg or RayConfig()
    if storage_cfg is not None:
        storage_cfg.apply()
    if not ray_cfg.progress_bars:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        return
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1", **storage.env_vars()}
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        local: dict[str, Any] = {}
        if ray_cfg.num_cpus is not None:
            local["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.num_gpus is not None:
            local["num_gpus"] = ray_cfg.num_gpus
        if ray_cfg.object_store_memory is not None:
            local["object_store_memory"] = ray_cfg.object_store_memory
        if ray_cfg.include_dashboard is not None:
            local["include_dashboard"] = ray_cfg.include_dashboard
        log.info("starting a local Ray instance %s", local or "(all local CPUs)")
        ray.init(address="local", **local, **kwargs)
    configure_data(ray_cfg)


def configure_data(ray_cfg: RayConfig) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(ray_cfg.progress_bars)
    ctx.enable_auto_log_stats = False
    ctx.print_on_execution_start = False


def cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def resolve_use_gpu(scaling: ScalingSettings) -> bool:
    """``use_gpu: auto`` -> True when the cluster has a GPU for every worker."""
    gpus = cluster_resources().get("GPU", 0.0)
    if scaling.use_gpu == "auto":
        return gpus >= scaling.num_workers * scaling.gpus_per_worker
    return bool(scaling.use_gpu)


def actor_pool_gpu(what: str, use_gpu: bool | str, cpus_per_actor: float) -> bool:
    """Whether a Ray Data actor pool takes one GPU per actor (``auto``: when the cluster has one), after checking
    that at least one actor fits: Ray Data would otherwise wait forever for resources that never come."""
    res = cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if cpus_per_actor > cpus + 1e-9:
        raise ResourceError(f"{what}: an actor asks for {cpus_per_actor:g} CPUs but the cluster has {cpus:g}",
                            "lower cpus_per_actor, or add nodes")
    if use_gpu is True and gpus < 1:
        raise ResourceError(f"{what}: use_gpu is true but the cluster has no GPU",
                            "set use_gpu: auto (or false), or add GPU nodes")
    return use_gpu is True or (use_gpu == "auto" and gpus >= 1)


def check_train_resources(scaling: ScalingSettings, use_gpu: bool, extra_cpus: float = 0.0) -> None:
    """Fail fast when ``num_workers`` x per-worker resources cannot fit the cluster (Train would wait forever)."""
    res = cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    need_cpu = scaling.num_workers * scaling.cpus_per_worker + extra_cpus
    if need_cpu > cpus + 1e-9:
        raise ResourceError(
            f"training asks for {scaling.num_workers} worker(s) x {scaling.cpus_per_worker:g} CPU"
            + (f" + {extra_cpus:g} CPU for the driver" if extra_cpus else "")
            + f" = {need_cpu:g} CPUs, but the cluster has {cpus:g}",
            "lower scaling.num_workers or scaling.cpus_per_worker, or add nodes")
    if use_gpu:
        need_gpu = scaling.num_workers * scaling.gpus_per_worker
        if need_gpu > gpus + 1e-9:
            raise ResourceError(
                f"training asks for {need_gpu:g} GPUs (scaling.use_gpu={scaling.use_gpu}) but the cluster has {gpus:g}",
                "set scaling.use_gpu: auto (or false), lower scaling.num_workers, or add GPU nodes")
