"""Checkpoint I/O: the official ``spai.pth`` layout, pretrained backbones, and our safetensors format.

Loading is strict and safe:
- strict: every parameter the model uses must be present with the right shape; keys the official model
  stores but never uses are ignored by name (the stored frequency mask is checked against the config);
  anything else is an error. fp16/bf16 tensors are cast to fp32.
- safe: ``.pth`` files are unpickled with an allow-list (tensors, containers, dtypes, numpy scalars). The
  official file pickles a yacs ``CfgNode``; it is read as plain data into a dict stand-in, never imported
  or run. (PyTorch's own weights-only unpickler cannot rebuild that dict subclass.) Any other global in the
  pickle is refused with an error naming it.

Our format is a ``.safetensors`` file whose metadata holds the model config (so the file alone rebuilds the
model: backbone, mask radius, sizes) and free-form provenance (training run, epoch, metrics). The backbone is stored
in timm's layout; the official file and our format 1 hold the MFM ViT's own (``q_bias``/``v_bias``), which
``backbones.mfm`` maps both ways. A fused (Sem-SPAI) detector is the same format with ``kind: fused`` in the header
and three models' tensors (``spai.``, ``semantic.model.``, ``head.``); :mod:`spai_core.fusion` reads and writes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .backbones import load_backbone_weights, mfm
from .config import from_dict
from .errors import UserError
from .filters import frequency_mask
from .spai import SPAI, ModelConfig, build_model, get_model_config

FORMAT_NAME = "spai-ray"
# 2: the backbone in timm's layout and named in the config. 1: the MFM ViT in its own layout, adapted on load.
FORMAT_VERSION = "2"
_VIT = "mfvit.vit."  # the backbone's keys in a SPAI state dict
# Official top-level keys that live under ``sca.`` in our module tree.
_SCA_KEYS = ("patch_aggregator", "to_kv.", "to_out.")
# Parameters the official model stores but never uses at inference (spec section 2).
_OFFICIAL_UNUSED = ("mfvit.vit.cls_pos_embed", "mfvit.vit.actual_cls_token", "mfvit.vit.fc_norm.",
                    "mfvit.vit.cls_blocks.", "mfvit.vit.intermediate_fc_norm.", "mfvit.vit.head.")
_MASK_KEY = "mfvit.frequencies_mask"


class CheckpointError(UserError, ValueError):
    """A weights file that is missing, corrupt, unsafe, or does not fit the model."""


class CfgNode(dict):
    """Stand-in for ``yacs.config.CfgNode`` so the official checkpoint's config unpickles as plain data."""


@dataclasses.dataclass
class LoadedCheckpoint:
    """Weights in our key layout, the config that built them, and provenance metadata."""

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig
    metadata: dict[str, Any]
    kind: str  # "spai-ray" | "official" | "mfm-backbone"


def official_to_ours_key(key: str) -> str:
    return "sca." + key if key.startswith(_SCA_KEYS) else key


def ours_to_official_key(key: str) -> str:
    return key[len("sca."):] if key.startswith("sca.") else key


# Globals a checkpoint may name: tensor rebuilders, containers, dtypes, numpy scalars. Nothing that runs code.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("_codecs", "encode"), ("torch", "Size"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
}
_NUMPY_DTYPES = {"Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle naming a global outside the allow-list: a file that would run code, not a damaged one."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only plain data; the official yacs ``CfgNode`` becomes our dict stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("yacs.config", "CfgNode"):
            return CfgNode
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "numpy.dtypes" and name in _NUMPY_DTYPES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"the file names the global {module}.{name}, which is not plain data")


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to ``torch.load``: its Unpickler (and legacy ``load``) are restricted."""

    Unpickler = _RestrictedUnpickler
    __name__ = "spai_restricted_pickle"

    @staticmethod
    def load(file, **kwargs) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _read_torch_file(path: Path) -> Any:
    """Unpickle a ``.pth`` file with the allow-list above, so no code in the file can run.

    torch gets the open file, not the path, so the bytes decide how it is read: given a path ending in
    ``.safetensors`` torch would hand it to safetensors, whose errors on non-safetensors bytes are not ours.
    """
    try:
        with open(path, "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except _RefusedGlobal as exc:
        raise CheckpointError(
            f"{path}: refused to load: {exc}. Only tensors, containers and the official yacs config are read, so "
            "no code in the file can run. If the file is trusted, load it with the code that wrote it and save "
            "its state dict with torch.save(model.state_dict(), ...)."
        ) from None
    # Garbage bytes fail inside the unpickler in many ways: a frame or length field past the address space
    # (OverflowError, MemoryError), a memo or stack lookup (LookupError), a missing attribute.
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError,
            ArithmeticError, MemoryError, LookupError, AttributeError) as exc:
        raise _not_weights(path, exc) from None


def _not_weights(path: Path, exc: Exception) -> CheckpointError:
    """One message for bytes neither reader accepts, whichever tried: the suffix says nothing about the bytes."""
    # The reader's reason on one line (some span lines); a failed download often saves an error page under the name.
    reason = " ".join(str(exc).split())
    return CheckpointError(f"{path}: neither a readable safetensors file nor a PyTorch checkpoint ({reason}); it may "
                           "be corrupt, truncated or not weights at all (e.g. an HTML error page saved by a failed "
                           "download); download or export it again")


def _read_head(path: Path) -> bytes:
    """The first 9 bytes of a weights file; a folder, a missing, unreadable or empty file is named as such."""
    try:
        if path.is_dir():
            raise CheckpointError(f"{path}: is a folder, not a weights file; give the file itself, e.g. "
                                  f"{path / 'spai.pth'} or a .safetensors file")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such weights file; check the path")
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:  # permission denied, I/O error: the OS's reason is what the user needs
        raise CheckpointError(f"{path}: cannot read the weights file: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"{path}: the file is empty (interrupted download?); download or export it again")
    return head


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file starts with an 8-byte header length, then the JSON header's ``{``."""
    return len(head) == 9 and head[8:9] == b"{"


def read_checkpoint(path: str | Path, config: ModelConfig | str | None = None) -> LoadedCheckpoint:
    """Read any supported weights file into our key layout (tensors cast to fp32), without building a model.

    ``config`` is needed only for official and MFM files, which carry no usable architecture description;
    it defaults to ``spai_vit_b16``.
    """
    path = Path(path)
    if _is_safetensors(_read_head(path)):
        return _read_ours(path)
    obj = _read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    cfg = get_model_config(config or "spai_vit_b16") if not isinstance(config, ModelConfig) else config
    wrapped = isinstance(obj.get("model"), Mapping)
    weights = obj["model"] if wrapped else obj
    if any(str(k).startswith("encoder.") for k in weights):
        return LoadedCheckpoint(_fp32(_strip_encoder(weights)), cfg, {"source": str(path)}, "mfm-backbone")
    return _from_official(path, weights, cfg, obj if wrapped else {})


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of any weights file as stored (safetensors, or a pickle read with the allow-list), e.g. a
    pretrained backbone; a ``{'model': ...}`` or ``{'state_dict': ...}`` wrapper is unwrapped."""
    path = Path(path)
    if _is_safetensors(_read_head(path)):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise _not_weights(path, exc) from None
    obj = _read_torch_file(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _map_backbone(state: Mapping[str, torch.Tensor], mapping) -> dict[str, torch.Tensor]:
    """``state`` with its backbone keys passed through a layout ``mapping`` (a checkpoint filter or its inverse)."""
    vit = {k[len(_VIT):]: v for k, v in state.items() if k.startswith(_VIT)}
    rest = {k: v for k, v in state.items() if not k.startswith(_VIT)}
    return {**rest, **{_VIT + k: v for k, v in mapping(vit).items()}}


def _fp32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _strip_encoder(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _from_official(path: Path, state: Mapping[str, Any], cfg: ModelConfig,
                   wrapper: Mapping[str, Any]) -> LoadedCheckpoint:
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if _MASK_KEY in state:
        cfg = dataclasses.replace(cfg, mask_radius=_radius_of_mask(path, state[_MASK_KEY], cfg.img_size))
    ours = {official_to_ours_key(k): v for k, v in state.items()
            if k != _MASK_KEY and not k.startswith(_OFFICIAL_UNUSED)}
    ours = _map_backbone(ours, mfm.checkpoint_filter_fn)
    meta = {"source": str(path)}
    if "epoch" in wrapper:
        meta["epoch"] = int(wrapper["epoch"])
    return LoadedCheckpoint(_fp32(ours), cfg, meta, "official")


def _radius_of_mask(path: Path, mask: torch.Tensor, size: int) -> int:
    """The radius that rebuilds a stored frequency mask exactly; the mask itself is not trusted blindly."""
    stored = mask.bool()
    for radius in range(1, size):
        if torch.equal(frequency_mask(size, radius), stored):
            return radius
    raise CheckpointError(f"{path}: its frequency mask is not a circular mask of any radius for {size}px tiles")


def _read_header(path: Path) -> dict[str, str]:
    """The metadata in a safetensors file's header (its tensors are not read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _not_weights(path, exc) from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors as stored and the header's metadata of a safetensors file."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _not_weights(path, exc) from None
    return state, _read_header(path)


def _parse_ours(path: Path, meta: Mapping[str, str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Format version, model config and provenance from our header; a foreign or newer file is an error."""
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: a safetensors file without our metadata; convert official weights with "
                              "`spai convert spai.pth spai.safetensors`")
    version = meta.get("format_version", "1")
    if version not in ("1", FORMAT_VERSION):
        raise CheckpointError(f"{path}: {FORMAT_NAME} format {version}, newer than this version reads "
                              f"({FORMAT_VERSION}); upgrade spai-ray")
    try:
        return version, json.loads(meta["model_config"]), json.loads(meta.get("metadata", "{}"))
    except (KeyError, ValueError) as exc:  # only a hand-edited or foreign file gets here; ours always parses
        raise CheckpointError(f"{path}: its {FORMAT_NAME} metadata is damaged ({exc!r}); export it again") from None


FUSED_KIND = "fused"  # the header's ``kind`` of a fused (Sem-SPAI) detector, whose tensors hold three models


def _read_ours(path: Path) -> LoadedCheckpoint:
    state, meta = _read_safetensors(path)
    if meta.get("kind") == FUSED_KIND:
        raise CheckpointError(f"{path}: a fused (Sem-SPAI) detector, not a SPAI model; score it with `spai score "
                              "--weights` or load it with spai_core.onnx_runtime.load_detector")
    version, config, provenance = _parse_ours(path, meta)
    cfg = from_dict(ModelConfig, config, where=f"{path}:model_config")
    if version == "1":  # config without a backbone: the MFM ViT, whose layout the filter adapts
        state = _map_backbone(state, mfm.checkpoint_filter_fn)
    return LoadedCheckpoint(_fp32(state), cfg, provenance, FORMAT_NAME)


def fit_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                 unexpected_ok: bool = False) -> list[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``expected`` (empty if
    nothing): missing keys, unexpected ones (unless ``unexpected_ok``), shape mismatches, a few of each named."""
    missing = [k for k in expected if k not in state]
    unexpected = [] if unexpected_ok else [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
    return problems


def is_fused(path: str | Path) -> bool:
    """Whether ``path`` is a fused (Sem-SPAI) detector checkpoint, from its header alone."""
    path = Path(path)
    return _is_safetensors(_read_head(path)) and _read_header(path).get("kind") == FUSED_KIND


def read_fused_parts(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """A fused checkpoint's tensors (fp32), raw header and provenance; any other file is an error."""
    path = Path(path)
    if not is_fused(path):
        raise CheckpointError(f"{path}: not a fused (Sem-SPAI) detector checkpoint")
    state, header = _read_safetensors(path)
    return _fp32(state), header, _parse_ours(path, header)[2]


def load_state_strict(model: SPAI, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load every parameter of ``model`` from ``state``; any missing, unexpected or mis-shaped key is an error."""
    problems = fit_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source} does not fit model {model.cfg.name}: " + "; ".join(problems) +
                              ". Is the model config right? (`spai convert --model NAME`; for training, the config's "
                              "model section)")
    model.load_state_dict(state, strict=True)


def load_backbone(model: SPAI, path: str | Path) -> None:
    """Load pretrained weights into the model's backbone, strictly, through its registry entry's checkpoint filter:
    a pretraining file (MFM's ``encoder.`` ViT, CLIP, timm) or the backbone of a full SPAI checkpoint."""
    state = read_tensors(path)
    if any(k.startswith(_VIT) for k in state):
        state = {k[len(_VIT):]: v for k, v in state.items() if k.startswith(_VIT)}
    load_backbone_weights(model.mfvit.vit, model.cfg.backbone, _fp32(state), str(path))


def load_model(path: str | Path, config: ModelConfig | str | None = None) -> tuple[SPAI, LoadedCheckpoint]:
    """Build the model a weights file describes (ours, or official with ``config``) and load it strictly."""
    ckpt = read_checkpoint(path, config)
    if ckpt.kind == "mfm-backbone":
        raise CheckpointError(f"{path}: a backbone-only (MFM) checkpoint; use it to initialise training "
                              "(`spai train --backbone ...`), not to score")
    model = build_model(ckpt.config)
    load_state_strict(model, ckpt.state_dict, str(path))
    return model.eval(), ckpt


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """Make the folder for a weights file about to be written; turn a failed write into a message, not a trace.

    torch reports a failed write as RuntimeError and safetensors as SafetensorError, both with the OS's reason.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise CheckpointError(f"{path}: is a folder; give the file to write, e.g. {path / 'spai.safetensors'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot write the weights file: {exc}") from None


def save_checkpoint(path: str | Path, model: SPAI, metadata: Mapping[str, Any] | None = None) -> None:
    """Write weights + model config + metadata as safetensors (loadable by ``load_model`` alone)."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "model_config": json.dumps(dataclasses.asdict(model.cfg)),
            "metadata": json.dumps(dict(metadata or {}), default=str)}
    with writing(path) as dst:
        save_file(state, str(dst), metadata=meta)


def _require_ours(path: Path) -> None:
    if not _is_safetensors(_read_head(path)):
        raise CheckpointError(f"{path}: a PyTorch checkpoint (the official layout?), which has no metadata to keep "
                              f"this in; convert it first: `spai convert {path} {path.with_suffix('.safetensors')}`, "
                              "and use that file")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance metadata of our checkpoint, from its header alone."""
    path = Path(path)
    _require_ours(path)
    return _parse_ours(path, _read_header(path))[2]


def update_metadata(src: str | Path, dst: str | Path, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``src`` (our format) to ``dst`` with ``changes`` merged into its provenance metadata; returns the new
    metadata. Tensors, their dtypes and the model config are copied as stored, so the file loads as before;
    ``dst`` may be ``src`` (replaced whole, through a temporary file)."""
    src = Path(src)
    _require_ours(src)
    state, header = _read_safetensors(src)
    provenance = {**_parse_ours(src, header)[2], **changes}
    header = {**header, "metadata": json.dumps(provenance, default=str)}
    with writing(dst) as path:
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata=header)
        tmp.replace(path)
    return provenance


def save_official(path: str | Path, model: SPAI, epoch: int = 0) -> None:
    """Write the official layout (``{'model': state_dict, 'epoch': ...}``) for use with the official code.

    Only used parameters are written (plus the frequency mask); the official loader is non-strict and keeps
    its own initial values for the unused extras.
    """
    if model.cfg.descriptor_norm or model.cfg.backbone != mfm.NAME:
        raise CheckpointError(f"model {model.cfg.name} has no official layout: the official model has only the "
                              f"{mfm.NAME} backbone (this one: {model.cfg.backbone}) and no descriptor_norm layer "
                              f"(this one: {model.cfg.descriptor_norm}); keep it in our .safetensors format")
    state = _map_backbone(model.state_dict(), mfm.to_official)
    state = {ours_to_official_key(k): v.detach().float().cpu() for k, v in state.items()}
    state[_MASK_KEY] = model.mfvit.frequencies_mask.long().cpu()
    with writing(path) as dst:
        torch.save({"model": state, "epoch": epoch}, str(dst))


def convert(src: str | Path, dst: str | Path, config: str | None = None) -> None:
    """Convert between the official ``.pth`` layout and ours; the direction follows ``dst``'s suffix."""
    if not str(dst).endswith((".safetensors", ".pth", ".pt")):
        raise CheckpointError(f"{dst}: name it .safetensors (our format) or .pth (the official layout); the suffix "
                              "picks the format")
    model, ckpt = load_model(src, config)
    if str(dst).endswith(".safetensors"):
        save_checkpoint(dst, model, {**ckpt.metadata, "converted_from": str(src)})
    else:
        save_official(dst, model, int(ckpt.metadata.get("epoch", 0)))
