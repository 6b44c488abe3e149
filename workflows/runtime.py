"""Connecting to Ray, and checking resources before asking for them (the console and log file are
:mod:`workflows.console`).

A Train run that asks for more CPUs or GPUs than the cluster has waits forever, so every workflow validates its
request against ``ray.cluster_resources()`` first and raises a ResourceError that says what to change.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from components import storage
from components.config import RayConfig, ScalingSettings, StorageConfig
from components.errors import DefectflowError, ResourceError

log = logging.getLogger("defectflow")


def init_ray(ray_cfg: RayConfig | None = None, storage_cfg: StorageConfig | None = None) -> None:
    """Start or join Ray once per process.

    Under ``ray job submit`` RAY_ADDRESS is set and we join that cluster; otherwise a local instance starts with the
    configured resources. Storage settings reach workers as explicit arguments (``storage.worker_settings()``); the
    environment variables of :func:`components.storage.env_vars` are only a fallback, and are left out where the job's
    own runtime_env already sets them: Ray refuses to merge a job's runtime_env with a ``ray.init`` runtime_env that
    names the same variable. ``RAY_TRAIN_V2_ENABLED`` is set in this process only (``workflows/__init__``); Ray Train
    passes it on to its controller and workers.
    """
    import ray

    ray_cfg = ray_cfg or RayConfig()
    if storage_cfg is not None:
        storage_cfg.apply()
    if not ray_cfg.progress_bars:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        return
    runtime_env = driver_runtime_env(job_runtime_env())
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
    if address:
        ignored = [k for k in ("num_cpus", "num_gpus", "object_store_memory") if getattr(ray_cfg, k) is not None]
        log.info("joining Ray cluster at %s%s", address,
                 f" (ray.{', ray.'.join(ignored)} apply only to a local instance: ignored)" if ignored else "")
        _ray_init(address, kwargs)
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
        _ray_init("local", {**local, **kwargs})
    configure_data(ray_cfg)


def job_runtime_env() -> dict[str, Any] | None:
    """The runtime_env of the Ray job whose driver this process is, or None when not started by ``ray job submit``.

    Ray's job supervisor hands the job's config to the entrypoint in RAY_JOB_CONFIG_JSON_ENV_VAR, and ``ray.init``
    merges it with the runtime_env it is given (dashboard/modules/job/job_supervisor.py, _private/worker.py).
    """
    raw = os.environ.get(storage.RAY_JOB_ENV)
    if not raw:
        return None
    try:
        env = json.loads(raw).get("runtime_env")
    except (ValueError, AttributeError):
        return {}
    return dict(env) if isinstance(env, dict) else {}


def driver_runtime_env(job_env: dict[str, Any] | None) -> dict[str, Any]:
    """The runtime_env this driver adds to the job's: storage fallback env vars and the RAY_ADDRESS worker hook,
    minus whatever the job's runtime_env already sets (a key in both makes ``ray.init`` fail)."""
    env_vars = storage.env_vars()
    wanted: dict[str, Any] = {"worker_process_setup_hook": _ray_address_hook()}
    if job_env is not None:
        job_vars = job_env.get("env_vars") or {}
        for key in [k for k in env_vars if k in job_vars]:
            if job_vars[key] != env_vars[key]:
                log.warning("the job's runtime_env sets %s=%s; workers get that (this driver has %s; storage "
                            "settings reach defectflow's tasks as arguments anyway)", key, job_vars[key],
                            env_vars[key])
            del env_vars[key]
        for key in [k for k in wanted if k in job_env]:
            log.warning("the job's runtime_env sets %s: defectflow's own is left out", key)
            del wanted[key]
    return {"env_vars": env_vars, **wanted} if env_vars else wanted


def _ray_address_hook() -> Any:
    """A worker setup hook pointing RAY_ADDRESS at the cluster the worker belongs to.

    Ray code in workers that looks its cluster up by itself (Train V2's PlacementGroupCleaner queries the state API)
    otherwise guesses from the Ray processes on the host: with another Ray instance there it fails with "Found
    multiple active Ray instances", or picks the instance of the last ``ray start``. The hook is nested so that
    cloudpickle ships it by value: workers run it without importing defectflow.
    """

    def export_ray_address() -> None:
        import os

        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    return export_ray_address


def _ray_init(address: str, kwargs: dict[str, Any]) -> None:
    """``ray.init`` with its user-fixable failures (cannot reach or authenticate to the cluster, a runtime_env that
    cannot be merged with the job's) turned into DefectflowError."""
    import ray
    from ray.exceptions import AuthenticationError

    where = "a local Ray instance" if address == "local" else f"the Ray cluster at {address}"
    try:
        ray.init(address=address, **kwargs)
    except AuthenticationError as e:
        raise DefectflowError(f"cannot authenticate to {where}: {e}",
                              "the cluster uses token authentication: set RAY_AUTH_MODE=token and the token "
                              "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from e
    except ConnectionError as e:
        raise DefectflowError(f"cannot connect to {where}: {e}",
                              "check ray.address / RAY_ADDRESS and that the cluster runs (`ray status --address "
                              "...`); unset both to start a local instance") from e
    except (ValueError, RuntimeError) as e:
        if "runtime env" in str(e):
            raise DefectflowError(
                f"cannot start the job's driver on {where}: {e}",
                "a key in the job's runtime_env (e.g. cluster/runtime_env.yaml) clashes with one defectflow sets: "
                "remove it from the runtime_env") from e
        raise DefectflowError(f"cannot start or join {where}: {e}",
                              "check ray.address / RAY_ADDRESS and the Ray logs (/tmp/ray/session_latest/logs)") from e


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
