"""Export a compacted model to files that need no bmrs: ``torch.export`` (.pt2) and ONNX.

Each export is loaded back and run on the example inputs; it must give the in-memory model's outputs
to 1e−5 (relative to their largest magnitude), or :class:`bmrs.errors.ModelError` says by how much it
differs.  A file that cannot be written (disk full, quota, read-only or unwritable folder) is a
:class:`bmrs.errors.WriteError`; the file is written atomically, so a previous one stays as it was.  The fast inference layers take PyTorch's own path while being traced, so the exported
graph holds only standard operators.  ONNX needs the ``export`` extra (onnx, onnxscript, onnxruntime).

Examples:
    small = bmrs.compact(model, x)
    export(small, x, "small.pt2")        # torch.export.load("small.pt2").module()(x)
    export(small, x, "small.onnx")       # onnxruntime.InferenceSession("small.onnx")
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError, WriteError, first_line
from ..io import TEMP_SUFFIX

__all__ = ["export", "EXPORT_FORMATS", "EXPORT_TOLERANCE"]

EXPORT_FORMATS = ("pt2", "onnx")
EXPORT_TOLERANCE = 1e-5


def _args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ConfigError("export takes example inputs as a tensor or a tuple of tensors")


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and output and isinstance(next(iter(output.values())), torch.Tensor):
        return next(iter(output.values()))  # e.g. transformers' ModelOutput: its first field
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"export: the model returns {type(output).__name__}; export models that return a tensor")


def _relative_error(got, want: torch.Tensor) -> float:
    got = torch.as_tensor(got, dtype=want.dtype)
    scale = float(want.abs().max()) or 1.0
    return float((got - want).abs().max()) / scale


def _batch_dynamic(args: tuple) -> tuple:
    """Every input's first axis (the examples) left free, so the export takes any batch size."""
    return tuple({0: torch.export.Dim.AUTO} if t.dim() else {} for t in args)


def _write_file(path: str, data: bytes) -> None:
    """``data`` into the (temporary) file ``path``, on disk before it is renamed."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _export_pt2(model: nn.Module, args: tuple, tmp: str) -> torch.Tensor:
    program = torch.export.export(model, args, dynamic_shapes=_batch_dynamic(args))
    buffer = io.BytesIO()  # (torch's own writer reports a full disk as "unexpected pos": written here instead)
    torch.export.save(program, buffer)
    _write_file(tmp, buffer.getbuffer())
    return _first_tensor(torch.export.load(tmp).module()(*args))


def _os_error(err: BaseException) -> OSError | None:
    """The OSError (a full disk, a quota, a read-only folder) that ``err`` is or was raised from, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _export_onnx(model: nn.Module, args: tuple, tmp: str) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'bmrs[export]'") from None
    names = [f"input{i}" for i in range(len(args))]
    torch.onnx.export(model, args, tmp, input_names=names, dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=_batch_dynamic(args))
    session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, args)})
    return torch.from_numpy(outputs[0])


def export(model: nn.Module, example_inputs: Any, path: str | Path, format: str | None = None) -> float:
    """Write ``model`` to ``path`` as .pt2 or .onnx (``format``, else the file's suffix); returns the largest
    relative difference of the reloaded export's outputs from the model's (≤ 1e−5, else ModelError).  A
    file that cannot be written raises :class:`bmrs.errors.WriteError` (a previous ``path`` is kept).

    Examples:
        err = export(small, torch.randn(1, 1, 32, 32), "lenet5-small.onnx")
    """
    path = Path(path)
    format = format or path.suffix.lstrip(".")
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)} (or a .pt2/.onnx file name), "
                          f"got {format!r}")
    args = _args(example_inputs)
    model = model.eval()
    with torch.no_grad():
        want = _first_tensor(model(*args)).detach().cpu()
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"cannot write {path}: {folder} is a file, not a folder")
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a folder; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{TEMP_SUFFIX}.{format}",  # loaders read
                                   dir=path.parent)                                          # the suffix
        os.close(fd)
    except OSError as err:
        raise WriteError.of(path, err) from None
    try:
        try:
            got = (_export_pt2 if format == "pt2" else _export_onnx)(model, args, tmp)
        except (ConfigError, ModelError):
            raise
        except Exception as err:
            if (cause := _os_error(err)) is not None:
                raise WriteError.of(path, cause) from None
            raise ModelError(f"export to {format} failed: {first_line(err, 200)}") from None
        error = _relative_error(got.detach().cpu(), want)
        if not error <= EXPORT_TOLERANCE:
            raise ModelError(f"the {format} export differs from the model by {error:.2e} (relative); not written")
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise WriteError.of(path, err) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return error
