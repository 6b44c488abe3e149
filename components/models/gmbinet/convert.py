"""Import the GMBINet authors' released checkpoints (``GMBINet-SDSaliency900.pt``, ``GBMINet-NRSD.pt``).

Their state_dicts have 726 tensors under the authors' module names. The mapping below is derived from our
architecture (not from a list of names), so it stays in step with :mod:`.model`; the unused ``decoder1..4`` and
``conv_final`` tensors are dropped. Checkpoints are read with ``torch.load(weights_only=True)``: nothing executable
is ever unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from components import artifact, storage
from components.errors import WeightsError
from components.models.base import Postprocessing
from components.models.gmbinet.detector import GMBINetDetector, GMBINetParams, authors_preprocessing
from components.models.gmbinet.model import CHANNEL_MULTIPLIERS, ConvBNReLU, GMBINet
from components.weights import read_state_dict

log = logging.getLogger(__name__)

# the released checkpoints are the constructor defaults
AUTHORS_INIT_FILTERS = 16
AUTHORS_BLOCKS = (3, 4, 6, 3)
AUTHORS_N = 4


def _module_pairs(blocks: tuple[int, ...] = AUTHORS_BLOCKS, n: int = AUTHORS_N) -> list[tuple[str, str]]:
    """(our module prefix, the authors' module prefix) for every conv/BN that carries weights."""

    def cbr(ours: str, conv: str, bn: str) -> list[tuple[str, str]]:
        return [(f"{ours}.conv", conv), (f"{ours}.bn", bn)]

    def separable(ours: str, theirs: str) -> list[tuple[str, str]]:
        # theirs is Sequential(dw conv, bn, relu, pw conv, bn, relu)
        return cbr(f"{ours}.dw", f"{theirs}.0", f"{theirs}.1") + cbr(f"{ours}.pw", f"{theirs}.3", f"{theirs}.4")

    pairs = cbr("stem", "encoder1.0", "encoder1.1")
    for k, num in enumerate(blocks):
        ours, theirs = f"stages.{k}", f"encoder{k + 2}"
        pairs += separable(f"{ours}.down", f"{theirs}.0.conv")
        for j in range(num):
            block = f"{ours}.blocks.{j}"
            for i in range(n):
                pairs += cbr(f"{block}.branches.{i}", f"{theirs}.{j + 1}.conv{i}.0", f"{theirs}.{j + 1}.conv{i}.1")
            pairs += cbr(f"{block}.fuse", f"{theirs}.{j + 1}.fusion.0", f"{theirs}.{j + 1}.fusion.1")
    pairs += cbr("decoder.reduce", "decoder5.conv.0", "decoder5.conv.1")
    for idx, level in enumerate((4, 3, 2, 1)):  # our fusions run coarsest first
        pairs += separable(f"decoder.fusions.{idx}", f"DF{level}.conv")
    pairs += [(f"heads.{k}.conv", f"conv_out{k + 1}.1") for k in range(5)]  # dropout is .0
    return pairs


def _reference_state() -> dict[str, torch.Tensor]:
    return GMBINet(init_filters=AUTHORS_INIT_FILTERS, blocks=AUTHORS_BLOCKS, n=AUTHORS_N).state_dict()


def _key_map() -> dict[str, str]:
    """Our state_dict key -> the authors' key, in our state_dict order."""
    prefixes = dict(_module_pairs())
    out = {}
    for key in _reference_state():
        module, leaf = key.rsplit(".", 1)
        if module not in prefixes:  # pragma: no cover - guards the table against model changes
            raise RuntimeError(f"no authors' name for GMBINet tensor {key}; update convert._module_pairs")
        out[key] = f"{prefixes[module]}.{leaf}"
    return out


def _unused_authors_modules() -> dict[str, dict[str, torch.Tensor]]:
    """The authors' modules the forward pass never calls, with tensors shaped like theirs (for the test helper)."""
    ch = [m * AUTHORS_INIT_FILTERS for m in CHANNEL_MULTIPLIERS]
    unused: dict[str, dict[str, torch.Tensor]] = {}
    for level in (4, 3, 2, 1):  # like decoder5 (128 -> 96): 96 -> 64, 64 -> 32, 32 -> 16, 16 -> 16
        cbr = ConvBNReLU(ch[level - 1], ch[max(level - 2, 0)], 1).state_dict()
        unused[f"decoder{level}.conv"] = {k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in cbr.items()}
    # conv_final: Dropout2d, then Conv3x3 over the 5 concatenated side outputs
    unused["conv_final.1"] = torch.nn.Conv2d(5, 1, 3, padding=1).state_dict()
    return {m: {f"{m}.{leaf}": v for leaf, v in sd.items()} for m, sd in unused.items()}


def _dropped_keys() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for sd in _unused_authors_modules().values() for k, v in sd.items()}


def authors_key_shapes() -> dict[str, tuple[int, ...]]:
    """The authors' 726 keys with their shapes, in their state_dict order."""
    ref = _reference_state()
    out: dict[str, tuple[int, ...]] = {}
    unused = _unused_authors_modules()
    for ours, theirs in _key_map().items():
        out[theirs] = tuple(ref[ours].shape)
        if theirs == "decoder5.conv.1.num_batches_tracked":  # their decoder4..1 are declared after decoder5
            for level in (4, 3, 2, 1):
                out.update({k: tuple(v.shape) for k, v in unused[f"decoder{level}.conv"].items()})
    out.update({k: tuple(v.shape) for k, v in unused["conv_final.1"].items()})
    return out


def authors_layout_random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state_dict laid out exactly like the authors' checkpoints (for tests: the real files are not
    redistributable). Values are moderate so that deep activations stay informative."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in authors_key_shapes().items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            out[key] = torch.tensor(int(torch.randint(1, 10_000, (), generator=g)), dtype=torch.long)
        elif leaf == "running_var":
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "weight" and len(shape) == 1:  # BatchNorm scale
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif leaf == "weight":
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = torch.randn(shape, generator=g) / fan_in**0.5
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def convert_authors_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' state_dict -> a state_dict for :class:`GMBINet` (``n=4``, ``init_filters=16``)."""
    key_map = _key_map()
    ref = _reference_state()
    dropped = _dropped_keys()
    wanted = set(key_map.values())
    missing = [k for k in key_map.values() if k not in sd]
    unexpected = [k for k in sd if k not in wanted and k not in dropped]
    if missing or unexpected:
        raise WeightsError(
            f"not a GMBINet checkpoint in the authors' layout: {len(missing)} tensors missing "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]})",
            "pass one of the authors' released state_dicts (logs/GMBINet-SDSaliency900.pt or logs/GBMINet-NRSD.pt); "
            "a defectflow artifact folder is loaded with `defectflow` directly, not imported")
    out: dict[str, torch.Tensor] = {}
    wrong = []
    for ours, theirs in key_map.items():
        tensor = sd[theirs]
        if not isinstance(tensor, torch.Tensor):
            raise WeightsError(f"checkpoint entry {theirs} is a {type(tensor).__name__}, not a tensor",
                               "pass a plain state_dict saved with torch.save(model.state_dict(), path)")
        if tuple(tensor.shape) != tuple(ref[ours].shape):
            wrong.append(f"{theirs}: {tuple(tensor.shape)} != {tuple(ref[ours].shape)}")
            continue
        out[ours] = tensor.detach().clone().to(ref[ours].dtype)
    if wrong:
        raise WeightsError(f"{len(wrong)} tensors have unexpected shapes (e.g. {wrong[:3]})",
                           "the checkpoint is not the default GMBINet(init_filters=16, n=4, blocks=(3,4,6,3))")
    present_dropped = sorted(k for k in sd if k in dropped)
    if present_dropped:
        modules = sorted({k.split(".", 1)[0] for k in present_dropped})
        log.info("dropped %d tensors of modules the authors' forward never uses: %s", len(present_dropped),
                 ", ".join(modules))
    return out


def load_authors_checkpoint(path_or_uri: str) -> dict[str, torch.Tensor]:
    """Read an authors' ``.pt`` (local or S3; never unpickled beyond tensors) converted to our module names."""
    return convert_authors_state_dict(read_state_dict(storage.normalize(path_or_uri)))


def import_authors_checkpoint(path_or_uri: str, out_uri: str, threshold: float = 0.5) -> str:
    """Turn an authors' checkpoint into a defectflow artifact with the preprocessing it was trained with."""
    uri = storage.normalize(path_or_uri)
    state = load_authors_checkpoint(uri)
    detector = GMBINetDetector(
        GMBINetParams(n=AUTHORS_N, init_filters=AUTHORS_INIT_FILTERS, blocks=AUTHORS_BLOCKS, side_output=0),
        authors_preprocessing(), Postprocessing(score="max", blur_sigma=0.0))
    try:
        detector.net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # pragma: no cover - convert_authors_state_dict already checked keys and shapes
        raise WeightsError(f"{uri}: converted weights do not fit GMBINet: {e}", "report this as a bug") from e
    detector.eval()
    out = artifact.save(detector, out_uri, threshold=threshold,
                        lineage={"imported_from": uri, "source": "authors' release"})
    log.info("imported the GMBINet authors' checkpoint %s into %s", uri, out)
    return out
