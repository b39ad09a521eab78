"""Inference speed of CondenseNet-86 before and after condensation: images per second of the
trained form (learned group convolutions: dense 1x1 convolutions with masked weights) against the
condensed form (index select + group convolutions), CPU, eval mode, one process: in eager
PyTorch, and with --onnx also in onnxruntime (both forms exported as mode=export does, with all of
onnxruntime's graph optimisations), where --profile adds the time per operator type.

    .venv/bin/python bench/condensenet_infer.py [--batches N] [--threads N] [--batch-size N] [--onnx [--profile]]

condensed/trained > 1 means the condensed network is faster. Random weights do not change the
speed; the network is pruned to the end of condensation first, as after training.
"""
import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from graphs.models.condensenet import CondenseNet, condense, count_macs

BATCH_SIZE = 64
FORMS = ("trained", "condensed")


def images_per_second(run, batch_size: int, batches: int) -> float:
    with torch.inference_mode():
        run()                                           # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            run()
        return batches * batch_size / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="timed batches per repeat (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--onnx", action="store_true", help="also export both forms and time them in onnxruntime")
    parser.add_argument("--profile", action="store_true", help="with --onnx: onnxruntime's time per operator type")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    trained = CondenseNet().eval()
    trained.condense_to(1.0)
    models = {"trained": trained, "condensed": condense(trained).eval()}
    images = torch.randn(args.batch_size, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(models["trained"](images), models["condensed"](images), atol=1e-4)
    runners = {f"eager {name}": partial(model, images) for name, model in models.items()}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.onnx:
            for name, model in models.items():
                session = onnx_session(model, folder / name, args.threads)
                feed = {session.get_inputs()[0].name: images.numpy()}
                runners[f"onnxruntime {name}"] = partial(session.run, None, feed)
        speeds = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                speeds[name].append(images_per_second(run, args.batch_size, args.batches))
        report(models, speeds, args)
        if args.onnx and args.profile:
            for name in models:
                print(f"onnxruntime {name}, ms per batch by operator type:\n" + profile(folder / name, images, args))


def onnx_session(model, folder: Path, threads: int):
    """model exported as mode=export does (checked against eager), in a session with all of
    onnxruntime's graph optimisations (its NCHWc layout among them) on `threads` threads."""
    import onnxruntime

    from utils.export import export_verified

    export_verified(model, (torch.randn(2, 3, 32, 32),), folder)
    return onnxruntime.InferenceSession(str(folder / "model.onnx"), session_options(threads, folder),
                                        providers=["CPUExecutionProvider"])


def session_options(threads: int, folder: Path, profiling: bool = False):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.enable_profiling, options.profile_file_prefix = profiling, str(folder / "profile")
    return options


def report(models: dict, speeds: dict, args):
    print(f"CondenseNet-86 inference, CPU, batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.repeats} interleaved repeats of {args.batches} batches")
    for name, values in speeds.items():
        model = models[name.split()[-1]]
        params = sum(p.numel() for p in model.parameters())
        print(f"  {name:<22} {statistics.median(values):8.0f} images/s   {params:>9,} parameters   "
              f"{count_macs(model) / 1e6:6.1f}M multiply-adds")
    for runtime in ("eager", "onnxruntime"):
        if f"{runtime} trained" in speeds:
            ratio = statistics.median(speeds[f"{runtime} condensed"]) / statistics.median(speeds[f"{runtime} trained"])
            print(f"{runtime}: condensed/trained speed {ratio:.2f}")
    if "onnxruntime trained" in speeds:
        ratio = statistics.median(speeds["onnxruntime condensed"]) / statistics.median(speeds["eager trained"])
        print(f"onnxruntime condensed / eager trained speed {ratio:.2f}")


def profile(folder: Path, images: torch.Tensor, args, runs: int = 5) -> str:
    """onnxruntime's own profile of `runs` batches, summed per operator type."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), session_options(args.threads, folder, True),
                                           providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {session.get_inputs()[0].name: images.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
            count[event["args"]["op_name"]] += 1 / runs
    total = sum(per_op.values())
    return "\n".join(f"  {op:<20} {ms:8.1f} ms  {ms / total:6.1%}  x{count[op]:.0f}"
                     for op, ms in per_op.most_common(10))


if __name__ == "__main__":
    main()
