"""A module to export/model.onnx (torch.onnx's dynamo exporter) and export/model.pt2
(torch.export), each checked against eager PyTorch before it is kept. Knows no agent: it takes
a module, an example batch, which dimensions are free and a folder.

The check runs a batch one sample larger than the traced example (so the batch dimension is
shown to be free) through onnxruntime and through the ExportedProgram loaded back from its file,
and compares both with the eager module. Both files are written to a temporary folder first and
moved into place only when both agree: a failed export leaves the folder as it was.
"""
import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from utils.errors import UserError

ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
INFERENCE_FILE = "inference.json"   # what turns raw inputs into the model's (a deployment without torch reads it)
# The largest absolute difference an export may show against eager PyTorch, as a fraction of the
# largest eager output (of at least 1): float32 kernels that sum in another order differ by ~1e-7
# of the values they add up; a wrong graph differs by whole units.
TOLERANCE = 1e-4
NEEDS = "mode \"export\" needs onnx, onnxscript and onnxruntime: pip install -r requirements.txt"
# The exporter's passes log every step at INFO ("No unused functions to remove", ...).
CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


class ExportError(UserError):
    pass


class ExportTarget(NamedTuple):
    """What an agent exports (its export_target()): the module, called as module(*example);
    torch.export's dynamic_shapes (None: the batch dimension free); the inputs to check on (None:
    the example with its first sample once more)."""
    module: torch.nn.Module
    example: tuple
    dynamic_shapes: tuple | None = None
    check: tuple | None = None


def batch_dimensions(example: tuple) -> tuple:
    """dynamic_shapes for torch.export: the first dimension of every input is free, one size for all."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in example)


def export_verified(module: torch.nn.Module, example: tuple, folder: Path, dynamic_shapes=None,
                    check: tuple | None = None, inference: dict | None = None) -> dict:
    """Export `module` (called as module(*example)) into folder/model.onnx and folder/model.pt2.
    dynamic_shapes: torch.export's, per input (default: the batch dimension free). check: the inputs
    to compare on (default: the example with its first sample repeated once more). inference: what
    preprocessing the model needs, written beside them as inference.json. Returns what results.json
    records: the files, the input shapes, the largest differences, the tolerance."""
    _require_onnx()
    module = module.eval().cpu()
    example = tuple(tensor.detach().cpu() for tensor in example)
    if check is None:
        check = tuple(torch.cat([tensor, tensor[:1]]) for tensor in example)    # (B + 1, ...)
    check = tuple(tensor.detach().cpu() for tensor in check)
    program = _exported_program(module, example, dynamic_shapes or batch_dimensions(example))
    folder = Path(folder)
    existed = folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))   # same file system: os.replace moves
    try:
        differences, allowed = _write_and_compare(module, program, check, partial)
        written = [ONNX_FILE, PT2_FILE]
        if inference is not None:
            (partial / INFERENCE_FILE).write_text(json.dumps(inference, indent=2) + "\n")
            written.append(INFERENCE_FILE)
        for name in written:
            os.replace(partial / name, folder / name)
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"onnx": str(folder / ONNX_FILE), "pt2": str(folder / PT2_FILE),
            "inference": str(folder / INFERENCE_FILE) if inference is not None else None,
            "example_shapes": [list(tensor.shape) for tensor in example],
            "check_shapes": [list(tensor.shape) for tensor in check],
            "max_abs_difference": differences, "tolerance": allowed}


def _require_onnx():
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")):
        raise ExportError(NEEDS)


def _exported_program(module, example: tuple, dynamic_shapes):
    try:
        with torch.no_grad():
            return torch.export.export(module, example, dynamic_shapes=dynamic_shapes)
    except Exception as e:   # untraceable Python in forward, a shape the free dimensions cannot take
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.export cannot export {type(module).__name__}: {reason} (see "
                          "https://pytorch.org/docs/stable/export.html for what forward() may do)") from e


def _write_and_compare(module, program, check: tuple, folder: Path) -> tuple[dict, float]:
    """Both files into folder, each loaded back and run on `check`: ({"torch.export": d,
    "onnxruntime": d}, allowed), the largest absolute differences from the eager module's outputs;
    an ExportError above the tolerance. torch.export's is checked first: the ONNX export, which
    takes most of the time, is skipped when it already fails."""
    with torch.no_grad():
        eager = _flat(module(*check))
    allowed = TOLERANCE * max([1.0] + [float(tensor.abs().max()) for tensor in eager if tensor.numel()])
    torch.export.save(program, folder / PT2_FILE)
    with torch.no_grad():
        reloaded = _flat(torch.export.load(folder / PT2_FILE).module()(*check))
    differences = {"torch.export": _checked(reloaded, eager, allowed, "torch.export", module, check)}
    with _quiet_loggers():
        torch.onnx.export(program, dynamo=True, verbose=False).save(str(folder / ONNX_FILE))
    runtime = [torch.from_numpy(array) for array in _onnxruntime_outputs(folder / ONNX_FILE, check)]
    differences["onnxruntime"] = _checked(runtime, eager, allowed, "ONNX (onnxruntime)", module, check)
    return differences, allowed


def _checked(outputs: list, eager: list, allowed: float, form: str, module, check: tuple) -> float:
    difference = _largest_difference(outputs, eager)
    if not difference <= allowed:       # a NaN fails too
        raise ExportError(f"the {form} form of {type(module).__name__} differs from eager PyTorch by up to "
                          f"{difference:.3g} (tolerance {allowed:.1g}) on a batch of {len(check[0])}; "
                          "nothing was written to export/")
    return difference


@contextlib.contextmanager
def _quiet_loggers():
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _onnxruntime_outputs(path: Path, inputs: tuple) -> list:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3            # errors only: its notes on unused initializers are noise
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {entry.name: tensor.numpy() for entry, tensor in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def _flat(outputs) -> list:
    if torch.is_tensor(outputs):
        return [outputs]
    return [tensor for item in outputs for tensor in _flat(item)]


def _largest_difference(outputs: list, expected: list) -> float:
    if len(outputs) != len(expected) or any(a.shape != b.shape for a, b in zip(outputs, expected)):
        return float("inf")
    return max((float((a.float() - b.float()).abs().max()) for a, b in zip(outputs, expected) if a.numel()),
               default=0.0)
