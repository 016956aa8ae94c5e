"""Checkpoints: plain tensors and data only (they load with ``weights_only=True``, so a downloaded
file cannot run code), written to a temporary file and renamed, so a kill at any moment leaves
the previous checkpoint intact."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from fastddpm.config import TrainConfig
from fastddpm.diffusion import Diffusion
from fastddpm.errors import UsageError
from fastddpm.files import atomic_write
from fastddpm.model import UNet

FORMAT = "fastddpm-checkpoint"
VERSION = 1


class Loaded(NamedTuple):
    model: UNet
    diffusion: Diffusion
    config: TrainConfig


def save_checkpoint(payload: dict, path) -> Path:
    with atomic_write(path, durable=True) as f:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
    return Path(path)


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, validated; a missing, truncated or foreign file is a UsageError."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"checkpoint {path}: is a directory; give a checkpoint file in it, e.g. "
                         f"{path / 'checkpoint.pt'}")
    if not path.is_file():
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise UsageError(f"checkpoint {path}: permission denied; make it readable") from None
    except Exception:  # torch raises many types, with texts that say nothing to a user (a pickle opcode, miniz)
        raise UsageError(f"checkpoint {path}: not a fastddpm checkpoint (truncated or foreign file); point at a "
                         "file written by fastddpm.train") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path}: not a fastddpm checkpoint (no '{FORMAT}' header); point at a "
                         "file written by fastddpm.train")
    if ckpt.get("version") != VERSION:
        raise UsageError(f"checkpoint {path}: format version {ckpt.get('version')} is not {VERSION}; use the "
                         "fastddpm release that wrote it")
    try:
        TrainConfig.from_dict(ckpt["config"]).validate()  # e.g. an unknown preset
        if not isinstance(ckpt["model"], dict):
            raise TypeError("'model'")
    except (KeyError, TypeError, AttributeError, UsageError) as e:
        raise UsageError(f"checkpoint {path}: damaged fastddpm checkpoint (bad or missing {e}); point at a file "
                         "written by fastddpm.train") from None
    return ckpt


def model_from_checkpoint(ckpt: dict, ema: bool = True, path="checkpoint") -> UNet:
    """The U-Net of a checkpoint, with its EMA weights where present (and ``ema``)."""
    config = TrainConfig.from_dict(ckpt["config"])
    model = UNet(config.base_channels)
    try:
        model.load_state_dict(ckpt["model"])
        if ema and ckpt.get("ema"):
            model.load_state_dict(ckpt["ema"], strict=False)
    except RuntimeError:  # torch's text lists every mismatched tensor, over many lines
        raise UsageError(f"checkpoint {path}: its weights do not fit the '{config.preset}' U-Net (tensors "
                         "missing, extra or of other shapes); point at a file written by fastddpm.train") from None
    return model.eval()


def load_checkpoint(path, device=None, ema: bool = True) -> Loaded:
    """(model, diffusion, config) of a checkpoint; the model holds the EMA weights where present."""
    if device is not None:
        from fastddpm.sampling import check_device

        device = check_device(device, cli=False)
    ckpt = read_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    model = model_from_checkpoint(ckpt, ema=ema, path=path)
    if device is not None:
        model.to(device)
    return Loaded(model, Diffusion(config.T, config.beta_start, config.beta_end, device=device), config)


def export_weights(path, out, dtype: torch.dtype = torch.float16) -> Path:
    """A sampling-only copy of a checkpoint: its config and its EMA weights (the raw ones where it has
    no EMA) in ``dtype``, about a quarter of the file (no optimizer state, no second copy of the
    weights). ``load_checkpoint`` and ``fastddpm.sample`` take it (the weights become fp32 again);
    ``--resume`` refuses it."""
    ckpt = read_checkpoint(path)
    weights = {**ckpt["model"], **(ckpt.get("ema") or {})}
    payload = {"config": ckpt["config"], "ran": ckpt.get("ran"), "ema": None, "epoch": ckpt.get("epoch"),
               "step": ckpt.get("step"),
               "model": {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()},
               "exported": {"from_ema": bool(ckpt.get("ema")), "dtype": str(dtype).removeprefix("torch.")}}
    return save_checkpoint(payload, out)
