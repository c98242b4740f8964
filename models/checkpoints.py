"""Safe, strict loading of the public CT-FM and PET-FM weights.

Two rules: nothing in a weight file may run code (safetensors for CT-FM; ``torch.load`` with
``weights_only=True`` and a minimal allow-list for PET-FM), and every tensor must land on a
parameter of the same name and shape (strict loading whose error lists every missing,
unexpected and mis-shaped key and names the file). Any problem raises
:class:`CheckpointError` (a ``ValueError``) naming the file and the reason.

Public weights (download them yourself; the tool never fetches anything):

* CT-FM: Hugging Face ``project-lighter/ct_fm_feature_extractor``, file ``model.safetensors``
  (flat keys, no prefix).
* PET-FM: SegAnyPET ``seganypet_v1.pth`` from Hugging Face ``YichiZhang98/SegAnyPET``
  (linked from https://github.com/YichiZhang98/SegAnyPET). Its container is not documented,
  so every plausible one is accepted (see :func:`read_pet_fm_state_dict`).
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from models.ct_fm import CTFMEncoder
from models.digest import sha256_file
from models.pet_fm import PETFMEncoder

__all__ = [
    "CT_FM_NAME",
    "PET_FM_NAME",
    "CT_FM_WEIGHTS",
    "PET_FM_WEIGHTS",
    "CheckpointError",
    "load_state_dict_strict",
    "read_ct_fm_state_dict",
    "read_pet_fm_state_dict",
    "load_ct_fm",
    "load_pet_fm",
    "random_ct_fm",
    "random_pet_fm",
]

CT_FM_NAME = "ct_fm_segresencoder"
PET_FM_NAME = "seganypet_vit_b_ori"
CT_FM_WEIGHTS = (
    "Hugging Face project-lighter/ct_fm_feature_extractor, file model.safetensors "
    "(https://huggingface.co/project-lighter/ct_fm_feature_extractor)"
)
PET_FM_WEIGHTS = (
    "SegAnyPET seganypet_v1.pth, Hugging Face YichiZhang98/SegAnyPET "
    "(https://huggingface.co/YichiZhang98/SegAnyPET, linked from https://github.com/YichiZhang98/SegAnyPET)"
)

#: Globals a PET-FM ``.pth`` may reference beyond torch's own weights-only set: the
#: ``args`` Namespace of a training dict, ``Counter`` (MultiStepLR milestones) and the
#: pieces numpy uses to pickle plain numeric scalars (e.g. a stored best Dice). Nothing here
#: can execute code; any other global is refused.
_PET_SAFE_GLOBALS: list[Any] = [argparse.Namespace, collections.Counter, np.dtype]
for _mod, _name in (("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")):
    try:
        _PET_SAFE_GLOBALS.append(getattr(__import__(_mod, fromlist=[_name]), _name))
        break
    except (ImportError, AttributeError):  # numpy 1.x names it numpy.core
        continue
_PET_SAFE_GLOBALS += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]

_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A weight file cannot be read safely or does not match the network."""


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Any], *, source: str) -> None:
    """Copy ``state_dict`` into ``module`` only if names and shapes match exactly.

    Args:
        module: the network to fill.
        state_dict: name -> tensor, already stripped of container prefixes.
        source: file (or description) named in the error.

    Raises:
        CheckpointError: listing missing keys, unexpected keys, non-tensor values and
            mis-shaped keys (file shape vs model shape), naming ``source``.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    not_tensor = sorted(k for k, v in state_dict.items() if k in expected and not isinstance(v, torch.Tensor))
    mis_shaped = sorted(
        f"{k} (file {list(v.shape)} vs model {list(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if not_tensor:
        problems.append(f"non-tensor values ({len(not_tensor)}): {_listing(not_tensor)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys ({len(mis_shaped)}): {_listing(mis_shaped)}")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not match {type(module).__name__} "
            f"({len(state_dict)} keys in file, {len(expected)} in model): " + "; ".join(problems)
        )
    try:
        module.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as err:  # e.g. a dtype torch cannot copy
        raise CheckpointError(f"{source}: cannot load weights into {type(module).__name__}: {err}") from err


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    return path


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str, *, source: str) -> dict[str, Any]:
    """Remove ``prefix`` from every key that has it; refuse a resulting name clash."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key[len(prefix) :] if key.startswith(prefix) else key
        if new in out:
            raise CheckpointError(f"{source}: key {new!r} appears both with and without the {prefix!r} prefix")
        out[new] = value
    return out


def read_ct_fm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read CT-FM weights from a safetensors file.

    Accepts flat keys as published, or keys prefixed ``encoder.`` (the authors' training
    checkpoints). BatchNorm ``num_batches_tracked`` buffers are filled with 0 when absent:
    they only matter in training mode, and the encoder never leaves eval mode.

    Args:
        path: ``model.safetensors``.

    Returns:
        Flat ``name -> tensor`` for :class:`~models.ct_fm.CTFMEncoder`.

    Raises:
        CheckpointError: missing or unreadable file, or not safetensors.
    """
    path = _require_file(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    state = _strip_prefix(state, "encoder.", source=str(path))
    for key in list(state):
        if key.endswith(".running_mean"):
            tracked = key[: -len("running_mean")] + "num_batches_tracked"
            state.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return state


def _torch_load_safe(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_PET_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message wraps the cause in generic advice; keep only the informative lines.
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        cause = [ln.replace("WeightsUnpickler error:", "").strip() for ln in lines if not ln.startswith(boiler)]
        cause = [c for c in cause if c] or [type(err).__name__]
        named = [c for c in cause if "global" in c.lower() and "weights_only" not in c]
        if named:
            raise CheckpointError(
                f"{path}: refused to unpickle: the file references objects outside the allow-list "
                f"(tensors, containers, argparse.Namespace, Counter, numeric numpy scalars): {named[0]}"
            ) from err
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({'; '.join(cause)})") from err
    except Exception as err:  # arbitrary bytes make the unpickler fail in arbitrary ways
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err


def read_pet_fm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the PET-FM image-encoder weights from a SegAnyPET / SAM-Med3D ``.pth``.

    Containers accepted:

    * a flat state dict of the whole SAM-Med3D model (``image_encoder.*``,
      ``prompt_encoder.*``, ``mask_decoder.*``);
    * a training dict holding it under ``model_state_dict`` (with ``args``, optimizer and
      scheduler state, which are ignored);
    * either of the above with DataParallel's ``module.`` prefix;
    * a bare encoder state dict (keys such as ``patch_embed.proj.weight`` with no prefix),
      e.g. one saved from :class:`~models.pet_fm.PETFMEncoder` itself.

    Only ``image_encoder.*`` keys are kept, prefix removed. Unpickling runs with
    ``weights_only=True`` plus a minimal allow-list, so a file carrying any other object is
    refused instead of executed.

    Args:
        path: the ``.pth`` file.

    Returns:
        Flat ``name -> tensor`` for :class:`~models.pet_fm.PETFMEncoder`.

    Raises:
        CheckpointError: missing/unreadable file, forbidden pickle content, or no encoder
            weights found.
    """
    path = _require_file(path)
    obj = _torch_load_safe(path)
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: expected a state dict (or a training dict with 'model_state_dict'), found {type(obj).__name__}"
        )
    bad_names = [repr(k) for k in obj if not isinstance(k, str)]
    if bad_names:
        raise CheckpointError(f"{path}: state dict has non-string keys: {_listing(bad_names)}")
    state = _strip_prefix(obj, "module.", source=str(path))
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
    elif "patch_embed.proj.weight" not in state:
        raise CheckpointError(
            f"{path}: no PET-FM image-encoder weights found (no 'image_encoder.*' keys and no bare "
            f"'patch_embed.proj.weight'); first keys: {_listing(sorted(state)[:5])}"
        )
    not_tensor = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensor:
        raise CheckpointError(f"{path}: encoder entries that are not tensors: {_listing(not_tensor)}")
    return dict(state)


def load_ct_fm(path: str | os.PathLike, **kwargs: Any) -> tuple[CTFMEncoder, str]:
    """Build the CT-FM encoder from a safetensors file, strictly.

    Args:
        path: ``model.safetensors`` (flat or ``encoder.``-prefixed keys).
        **kwargs: architecture overrides for :class:`CTFMEncoder` (defaults = the release).

    Returns:
        ``(model, sha256)``: the eval-mode encoder and the file's hex SHA-256.
    """
    state = read_ct_fm_state_dict(path)
    model = CTFMEncoder(**kwargs)
    load_state_dict_strict(model, state, source=str(path))
    return model.eval(), sha256_file(path)


def load_pet_fm(path: str | os.PathLike, fast_windowed: bool = True, **kwargs: Any) -> tuple[PETFMEncoder, str]:
    """Build the PET-FM encoder from a SegAnyPET ``.pth``, strictly.

    Args:
        path: weight file (see :func:`read_pet_fm_state_dict` for accepted containers).
        fast_windowed: windowed-attention implementation (both give the same numbers).
        **kwargs: architecture overrides for :class:`PETFMEncoder` (defaults = ``vit_b_ori``).

    Returns:
        ``(model, sha256)``: the eval-mode encoder and the file's hex SHA-256.
    """
    state = read_pet_fm_state_dict(path)
    model = PETFMEncoder(fast_windowed=fast_windowed, **kwargs)
    load_state_dict_strict(model, state, source=str(path))
    return model.eval(), sha256_file(path)


def random_ct_fm(seed: int, **kwargs: Any) -> CTFMEncoder:
    """Deterministically initialised CT-FM (MONAI's default init), for demos and tests.

    BatchNorm running statistics are also drawn (mean ~ N(0, 0.1), var ~ U(0.5, 1.5)) so
    that the eval-mode normalisation is not the identity. The global RNG is untouched.

    Args:
        seed: same seed -> same weights.
        **kwargs: passed to :class:`CTFMEncoder` (e.g. a narrow ``init_filters``).
    """
    return _seeded(seed, lambda: CTFMEncoder(**kwargs), _draw_batchnorm_statistics)


def random_pet_fm(seed: int, **kwargs: Any) -> PETFMEncoder:
    """Deterministically initialised PET-FM, for demos and tests.

    Upstream zero-initialises ``pos_embed`` and the relative-position tables; here they are
    drawn from N(0, 0.02) so that every code path (including the relative-position quirk)
    affects the output. Linear/conv layers use torch's default init (non-zero biases).
    The global RNG is untouched.

    Args:
        seed: same seed -> same weights.
        **kwargs: passed to :class:`PETFMEncoder` (e.g. a tiny config).
    """
    return _seeded(seed, lambda: PETFMEncoder(**kwargs), _draw_position_tables)


def _seeded(seed: int, build: Callable[[], nn.Module], draw: Callable[[nn.Module], None]) -> nn.Module:
    """``build()`` then ``draw(model)`` from ``seed`` alone, in eval mode; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA RNGs untouched
        model = build()
        with torch.no_grad():
            draw(model)
    return model.eval()


def _draw_batchnorm_statistics(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0.0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)


def _draw_position_tables(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if name == "pos_embed" or ".rel_pos_" in name:
            param.normal_(0.0, 0.02)
