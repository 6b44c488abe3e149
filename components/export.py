"""Model export: a whole Detector (pre- and post-processing included) as one ONNX graph, checked against eager.

    images (B, 3, H, W) float RGB in [0, 1]  ->  score (B,), anomaly_map (B, 1, H, W) in [0, 1]

The exporter is torch's current one (``torch.onnx.export(..., dynamo=True)``: ``torch.export`` capture, then the
onnxscript translation). The TorchScript exporter (``dynamo=False``, deprecated by torch) is only a fallback for a
graph ``torch.export`` cannot capture, and the result says which exporter ran and why. Every export is checked: ONNX
Runtime and the eager Detector run the same random and surface-like images and the largest absolute differences of
``score`` and ``anomaly_map`` must stay within a tolerance, otherwise nothing is written (unless the caller accepts
the mismatch, which is then recorded). A graph neither exporter handles is a ``DefectflowError`` naming the family
and the operator or construct at fault.

No Ray here; ``onnx``/``onnxruntime``/``onnxscript`` are imported only when an export runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components import storage
from components.errors import ConfigError, DefectflowError

log = logging.getLogger(__name__)

ONNX_INPUT = "images"
ONNX_OUTPUTS = ("score", "anomaly_map")
DEFAULT_OPSET = 18  # the opset torch's exporter implements natively (lower ones go through a version converter)
DEFAULT_ATOL = 1e-4  # both outputs are probabilities in [0, 1]
EXPORTERS = ("auto", "dynamo", "torchscript")
SIDECAR_FORMAT = "defectflow-onnx"


class ExportError(DefectflowError):
    """A detector could not be exported, or its export does not compute what the eager detector computes."""


@dataclasses.dataclass
class ExportResult:
    """What was exported and how; ``parity`` holds the ONNX-vs-eager differences."""

    uri: str
    family: str
    exporter: str  # "dynamo" (torch.export-based) or "torchscript"
    fallback_reason: str | None  # why the dynamo exporter was not used, when it was not
    opset: int  # the default-domain opset in the written file
    opset_requested: int
    input_size: list[int]  # the (H, W) the graph was exported and checked at
    dynamic_batch: bool  # achieved, not requested: read back from the written graph
    dynamic_size: bool
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parity: dict[str, Any]
    notes: list[str]
    bytes: int
    seconds: float
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then back in the mode it was found in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """A CPU onnxruntime session; ``threads`` pins intra-op threads (benchmarks), None lets ORT choose."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_run(session: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, anomaly_map) from an onnxruntime session, as torch tensors."""
    score, amap = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: images.detach().cpu().float().numpy()})
    return torch.from_numpy(score), torch.from_numpy(amap)


def probe_images(batch: int, size: Sequence[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for the parity check: uniform noise (every pixel value, no structure) and a surface-like image (a
    smooth grey texture with fine grain, one bright disc and one dark scratch), so both the "nothing here" and the
    "defect here" regimes of the post-processing are compared."""
    h, w = (int(s) for s in size)
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 3, h, w, generator=g)
    coarse = torch.rand(batch, 1, max(2, h // 8), max(2, w // 8), generator=g)
    base = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    surface = 0.4 + 0.15 * base + 0.04 * torch.rand(batch, 3, h, w, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r = max(2, min(h, w) // 10)
    for i in range(batch):
        cy, cx = (int(torch.randint(r, max(r + 1, d - r), (1,), generator=g)) for d in (h, w))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        surface[i, :, disc] += 0.35
        row = int(torch.randint(0, h, (1,), generator=g))
        surface[i, :, row, w // 4: 3 * w // 4] -= 0.3
    return {"random": noise, "surface": surface.clamp(0.0, 1.0)}


def _family(detector: nn.Module) -> str:
    return str(getattr(detector, "family", "") or type(detector).__name__)


def _network_size(detector: nn.Module) -> tuple[int, int] | None:
    pre = getattr(detector, "preprocessing", None)
    size = getattr(pre, "input_size", None)
    return (int(size[0]), int(size[1])) if size else None


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Keep the exporters' console output (graph dumps on failure, TracerWarnings, deprecation notices) out of the
    user's terminal; it is logged at debug level instead."""
    buf = io.StringIO()
    loggers = {name: logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")}
    levels = {name: lg.level for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])
        text = buf.getvalue().strip()
        if text:
            log.debug("exporter output:\n%s", text[-20000:])


_CAUSES = (
    (re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),
     "operator {0} has no ONNX translation in torch's exporter"),
    (re.compile(r"Exporting the operator '([^']+)' to ONNX opset version (\d+) is not supported"),
     "operator {0} is not supported by the TorchScript exporter at opset {1}"),
    (re.compile(r"(GuardOnDataDependentSymNode|data-dependent expression)"),
     "data-dependent control flow (a Python `if` on a tensor value) cannot be captured by torch.export"),
    (re.compile(r"Unsupported ONNX opset version:? (\d+)"), "opset {0} is not supported by this exporter"),
)


def failure_cause(exc: BaseException) -> str:
    """One line saying what an exporter choked on (the operator, when it names one)."""
    if isinstance(exc, ImportError) and "onnxscript" in str(exc):
        return "onnxscript is not installed (pip install onnxscript)"
    text = str(exc)
    for pattern, template in _CAUSES:
        m = pattern.search(text)
        if m:
            return template.format(*m.groups())
    summary = text.split("Exception summary", 1)[-1].strip().splitlines()
    first = next((line.strip() for line in summary if line.strip()), "") or type(exc).__name__
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    return f"{type(exc).__name__}: {first}"[:300]


# --------------------------------------------------------------------------------------------- exporters


def _export_dynamo(detector: nn.Module, example: torch.Tensor, path: str, opset: int, dynamic_batch: bool,
                   dynamic_size: bool) -> None:
    axes: dict[int, str] = {}
    if dynamic_batch:
        axes[0] = "batch"
    if dynamic_size:
        axes.update({2: "height", 3: "width"})
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(detector, (example,), None, input_names=[ONNX_INPUT],
                                    output_names=list(ONNX_OUTPUTS), opset_version=opset, dynamo=True,
                                    dynamic_shapes=(axes,) if axes else None, verbose=False)
        program.save(path, external_data=False)  # one file (torch still splits models over 2 GB)


def _export_torchscript(detector: nn.Module, example: torch.Tensor, path: str, opset: int,
                        dynamic_batch: bool) -> None:
    axes = {name: {0: "batch"} for name in (ONNX_INPUT, *ONNX_OUTPUTS)} if dynamic_batch else None
    with _quiet(), torch.no_grad():
        torch.onnx.export(detector, (example,), path, input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                          opset_version=opset, dynamo=False, dynamic_axes=axes)


def _shape(value_info: Any) -> list[int | str]:
    return [d.dim_param or int(d.dim_value) for d in value_info.type.tensor_type.shape.dim]


def _describe(path: str, metadata: Mapping[str, Any] | None) -> tuple[list[dict], list[dict], int]:
    """Input/output names and shapes and the opset of the written file; stamps ``metadata`` into it."""
    import onnx
    from onnx import helper

    model = onnx.load(path)
    if metadata:
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key = str(key)
            entry.value = value if isinstance(value, str) else json.dumps(value)
        onnx.save(model, path)

    def io_rows(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "shape": _shape(v),
                 "dtype": str(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))} for v in values]

    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)
    return io_rows(model.graph.input), io_rows(model.graph.output), opset


# --------------------------------------------------------------------------------------------- parity


def check_parity(detector: nn.Module, path: str, probes: Mapping[str, torch.Tensor], atol: float) -> dict[str, Any]:
    """Largest |ONNX - eager| of score and anomaly_map over the probe inputs, and whether both are within ``atol``."""
    session = onnx_session(path)
    rows = []
    for name, images in probes.items():
        with torch.no_grad():
            ref = detector(images)
        score, amap = onnx_run(session, images)
        same_shape = tuple(score.shape) == tuple(ref.score.shape) and tuple(amap.shape) == tuple(ref.anomaly_map.shape)
        ds = float((score - ref.score).abs().max()) if same_shape else float("inf")
        dm = float((amap - ref.anomaly_map).abs().max()) if same_shape else float("inf")
        rows.append({"name": name, "shape": list(images.shape), "score_max_abs_diff": ds,
                     "anomaly_map_max_abs_diff": dm, "shapes_match": same_shape})
    ok = all(r["shapes_match"] and r["score_max_abs_diff"] <= atol and r["anomaly_map_max_abs_diff"] <= atol
             for r in rows)  # a NaN compares False: not ok
    ds = max((r["score_max_abs_diff"] for r in rows), key=lambda v: math.inf if math.isnan(v) else v)
    dm = max((r["anomaly_map_max_abs_diff"] for r in rows), key=lambda v: math.inf if math.isnan(v) else v)
    return {"ok": bool(ok), "atol": float(atol), "score_max_abs_diff": ds, "anomaly_map_max_abs_diff": dm,
            "probes": rows}


# --------------------------------------------------------------------------------------------- the export


def export_onnx(detector: nn.Module, uri: str | os.PathLike, input_size: Sequence[int] | None = None, *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, dynamic_size: bool = False,
                exporter: str = "auto", atol: float = DEFAULT_ATOL, allow_mismatch: bool = False,
                metadata: Mapping[str, Any] | None = None) -> ExportResult:
    """Export ``detector`` to an ONNX file at ``uri`` (local path or s3://) and check it against eager PyTorch.

    ``input_size`` (H, W) is the image size the graph takes (default: the network's own input size; a larger one
    puts the resize into the graph, so camera frames can be fed as they are). ``dynamic_batch`` / ``dynamic_size``
    ask for symbolic batch / spatial axes; what the written graph actually has is in the result (and a note says
    why when a request could not be met). ``exporter``: ``auto`` = torch.export-based, falling back to TorchScript
    only when capture or translation fails; ``dynamo``/``torchscript`` force one. ``atol`` bounds the max absolute
    ONNX-vs-eager difference of both outputs; beyond it nothing is written unless ``allow_mismatch``.
    ``metadata`` is stamped into the file's metadata_props (strings, other values as JSON).
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}", f"choose one of {list(EXPORTERS)}")
    family = _family(detector)
    size = tuple(int(s) for s in (input_size or _network_size(detector) or ()))
    if len(size) != 2 or min(size) < 8:
        raise ConfigError(f"export input size must be (height, width), both >= 8; got {input_size}",
                          "pass e.g. --size 256 256")
    uri = storage.normalize(uri)
    t0 = time.perf_counter()
    notes: list[str] = []
    batch = 2 if dynamic_batch else 1  # torch.export specialises an axis whose example size is 1
    # a spatial axis only stays symbolic when the example differs from the network's size, so the resize inside
    # the Detector is traced (at the network's own size the shape check skips it and the graph fixes H and W)
    example_size = size
    net = _network_size(detector)
    if dynamic_size and net is not None and size == net:
        example_size = (size[0] + max(8, size[0] // 4), size[1] + max(8, size[1] // 4))
    detector = detector.to("cpu")
    fallback_reason = None
    used = None
    with eval_mode(detector), tempfile.TemporaryDirectory(prefix="defectflow-export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        attempts: list[tuple[str, str]] = []
        if exporter in ("auto", "dynamo"):
            try:
                try:
                    _export_dynamo(detector, torch.rand(batch, 3, *example_size), path, opset, dynamic_batch,
                                   dynamic_size)
                except Exception as e:
                    if not dynamic_size:
                        raise
                    # is it the symbolic spatial axes? (if the fixed-size export fails too, that failure counts)
                    _export_dynamo(detector, torch.rand(batch, 3, *size), path, opset, dynamic_batch, False)
                    notes.append(f"spatial size fixed at {size[0]}x{size[1]}: the {family} graph specialises on "
                                 f"it ({failure_cause(e)}); resize images to {size[0]}x{size[1]} before inference")
                    dynamic_size, example_size = False, size
                used = "dynamo"
            except Exception as e:
                attempts.append(("dynamo", failure_cause(e)))
                log.debug("dynamo export of %s failed", family, exc_info=True)
                if exporter == "dynamo":
                    raise _unexportable(family, attempts, opset) from e
                fallback_reason = f"torch.export-based exporter failed: {attempts[-1][1]}"
                log.warning("%s: %s; falling back to the TorchScript exporter", family, fallback_reason)
        if used is None:
            if dynamic_size:
                notes.append(f"spatial size fixed at {size[0]}x{size[1]}: the TorchScript exporter records shape "
                             "checks as constants, so only the batch axis can be dynamic")
                dynamic_size, example_size = False, size
            try:
                _export_torchscript(detector, torch.rand(batch, 3, *size), path, opset, dynamic_batch)
                used = "torchscript"
            except Exception as e:
                attempts.append(("torchscript", failure_cause(e)))
                log.debug("TorchScript export of %s failed", family, exc_info=True)
                raise _unexportable(family, attempts, opset) from e
        extra = sorted(set(os.listdir(tmp)) - {"model.onnx"})
        if extra:  # torch moves weights over 2 GB into external data files
            raise ExportError(f"the {family} ONNX graph keeps its weights in external data files ({extra[:3]}), "
                              "which this export does not write yet",
                              "export a smaller model (ONNX files are limited to 2 GB)")
        inputs, outputs, opset_written = _describe(path, {"defectflow.family": family, "defectflow.exporter": used,
                                                          **(metadata or {})})
        in_shape = inputs[0]["shape"] if inputs else []
        got_batch = bool(in_shape) and isinstance(in_shape[0], str)
        got_size = len(in_shape) == 4 and isinstance(in_shape[2], str) and isinstance(in_shape[3], str)
        if dynamic_batch and not got_batch:
            notes.append(f"batch axis fixed at {batch}: the {used} exporter did not keep it symbolic")
        if dynamic_size and not got_size:
            notes.append(f"spatial size fixed at {size[0]}x{size[1]}: the exported graph specialised on it")

        probes = probe_images(2 if got_batch else 1, size)
        if got_size:  # a symbolic spatial axis is checked at a second size too
            other = next(c for c in (example_size, net, (size[0] + 8, size[1] + 8)) if c and tuple(c) != size)
            probes[f"random@{other[0]}x{other[1]}"] = probe_images(1, other, seed=1)["random"]
        parity = check_parity(detector, path, probes, atol)
        log.info("%s ONNX (%s exporter, opset %d) vs eager: max |d score| %.3g, max |d map| %.3g (atol %g)",
                 family, used, opset_written, parity["score_max_abs_diff"], parity["anomaly_map_max_abs_diff"], atol)
        if not parity["ok"]:
            if not allow_mismatch:
                raise ExportError(
                    f"the ONNX export of the {family} detector ({used} exporter) does not match eager PyTorch: "
                    f"max |d score| = {parity['score_max_abs_diff']:.3g}, max |d anomaly_map| = "
                    f"{parity['anomaly_map_max_abs_diff']:.3g}, tolerance {atol:g}; nothing was written",
                    "a graph with randomness or data-dependent branches exports wrongly; try the other exporter "
                    "(--exporter torchscript / dynamo), or accept the difference with a larger --atol or "
                    "--allow-mismatch (recorded in the sidecar)")
            notes.append(f"parity check FAILED (tolerance {atol:g}), written anyway as asked")
        nbytes = os.path.getsize(path)
        storage.upload_file(path, uri)
    import onnx
    import onnxruntime

    result = ExportResult(
        uri=uri, family=family, exporter=used, fallback_reason=fallback_reason, opset=opset_written,
        opset_requested=int(opset), input_size=list(size), dynamic_batch=got_batch, dynamic_size=got_size,
        inputs=inputs, outputs=outputs, parity=parity, notes=notes, bytes=nbytes,
        seconds=round(time.perf_counter() - t0, 2),
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})
    log.info("exported %s to %s (%s exporter, %.1f s)", family, uri, used, result.seconds)
    return result


def _unexportable(family: str, attempts: list[tuple[str, str]], opset: int) -> ExportError:
    names = {"dynamo": "torch.export-based exporter", "torchscript": "TorchScript exporter"}
    tried = "; ".join(f"{names[k]}: {cause}" for k, cause in attempts)
    return ExportError(
        f"the {family} detector cannot be exported to ONNX ({tried})",
        f"the {family} forward uses something ONNX cannot express at opset {opset}: rewrite that part of the "
        "family's module with exportable operations (or register a custom translation), or try another --opset; "
        "the artifact itself still runs in PyTorch (`defectflow predict`, `defectflow serve`)")


# --------------------------------------------------------------------------------------------- sidecar


def sidecar_uri(onnx_uri: str) -> str:
    """``model.onnx`` -> ``model.onnx.json`` (beside it, never confused with an artifact's detector.json)."""
    return storage.normalize(onnx_uri) + ".json"


def sidecar(result: ExportResult, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a consumer of the .onnx needs besides the graph: I/O contract, the exporter and parity figures, and the
    source artifact's decision thresholds, so it applies the same decision as ``defectflow predict``/serve."""
    meta = dict(meta or {})
    out: dict[str, Any] = {
        "format": SIDECAR_FORMAT, "format_version": 1,
        "onnx": storage.basename(result.uri),
        "family": result.family,
        "exporter": result.exporter,
        "fallback_reason": result.fallback_reason,
        "opset": result.opset,
        "input_size": result.input_size,
        "dynamic_batch": result.dynamic_batch,
        "dynamic_size": result.dynamic_size,
        "inputs": result.inputs,
        "outputs": result.outputs,
        "input_contract": "images: float32 RGB, NCHW, values in [0, 1]; resizing to the network's size and "
                          "normalisation happen inside the graph",
        "parity": result.parity,
        "notes": result.notes,
        "versions": result.versions,
    }
    if meta:
        out["model"] = {
            "artifact": meta.get("uri"),
            "family": meta.get("family"),
            "input_size": meta.get("input_size"),
            "threshold": meta.get("threshold"),
            "pixel_threshold": meta.get("pixel_threshold", meta.get("threshold")),
            "threshold_info": meta.get("threshold_info"),
            "registry": meta.get("registry"),
            "lineage": meta.get("lineage"),
            "created": meta.get("created"),
        }
        out["decision"] = {"is_defect": "score >= model.threshold",
                           "defect_mask": "anomaly_map >= model.pixel_threshold"}
    return out
