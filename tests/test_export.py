"""Issue 16: mode=export writes export/model.onnx and export/model.pt2 (and results.json's "export"
entry, nothing else of the experiment) for every shipped agent that has a model to export, and a
scaffolded one. The files are checked here again, on real inputs of a batch size they were not
traced with: onnxruntime and the reloaded ExportedProgram agree with load_trained's eager model.
Exporting with the dynamo exporter takes seconds: each test exports once and checks everything
on that export; the trained runs come from the session fixture shipped_runs."""
import json
import sys

import gymnasium as gym
import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from agents.trained import load_trained
from tests.conftest import ROOT, group, one_error_line, run_main_in_process, set_args, snapshot, synthetic_digits
from utils.export import TOLERANCE, ExportError, export_verified

EXPORTED = {"export/model.onnx", "export/model.pt2", "export/inference.json"}


def real_batch(name, preprocess, request) -> torch.Tensor:
    """Inputs the model was made for, 5 of them (ERFNet: 2 of one image's size), through preprocess."""
    if name.startswith("mnist"):
        return preprocess([Image.fromarray(image.numpy()) for image in synthetic_digits(5, seed=3)[0]])
    if name.startswith("condensenet"):
        pixels = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
        return preprocess([Image.fromarray(image) for image in pixels.numpy()])
    if name.startswith("erfnet"):
        voc = request.getfixturevalue("voc_folder") / "VOCdevkit" / "VOC2012" / "JPEGImages"
        image = Image.open(sorted(voc.glob("*.jpg"))[0])
        return torch.cat([preprocess(image), preprocess(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    if name.startswith("dcgan"):
        return preprocess(5)
    if name.startswith("dqn"):   # pixel mode: the rendered screens' differences the agent sees
        from agents.dqn import ScreenDifference

        env = gym.make("CartPole-v1", render_mode="rgb_array" if "pixels" in name else None)
        env = ScreenDifference(env, 40) if "pixels" in name else env
        observations = [env.reset(seed=0)[0]]
        for action in (0, 1, 0, 1):
            observations.append(env.step(action)[0])
        return preprocess(observations)
    from datasets.iris import load_iris_tensors
    return preprocess(load_iris_tensors()[0][[0, 1, 50, 100, 149]])


def check_files(exp, model, batch):
    """onnxruntime and the ExportedProgram loaded back give what the eager model gives."""
    with torch.no_grad():
        eager = model(batch)
        exported = torch.export.load(exp / "export" / "model.pt2").module()(batch)
    session = onnxruntime.InferenceSession(str(exp / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    (runtime,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    allowed = TOLERANCE * max(1.0, float(eager.abs().max()))
    assert float((torch.from_numpy(runtime) - eager).abs().max()) <= allowed
    assert float((exported - eager).abs().max()) <= allowed


@pytest.mark.parametrize("name", [group(name) for name in
                                  ("mnist_exp_0", "condensenet_exp_0", "erfnet_exp_0", "dcgan_exp_0", "dqn_exp_0",
                                   "dqn_pixels_exp_0", "iris_exp_0")])
def test_export_writes_files_that_agree_with_eager(name, shipped_runs, tmp_path, request):
    run = shipped_runs[name]
    exp = run.copy_to(tmp_path)
    extra, checkpoint = {}, "model_best"
    if name == "condensenet_exp_0":           # the condensed network, the form CondenseNet is deployed in
        condense = set_args(mode="condense", checkpoint_file="checkpoint.pth.tar")   # fully condensed
        assert run_main_in_process([*run.args, *condense], tmp_path).returncode == 0
        extra, checkpoint = {"condensed": True}, "condensed"
    elif name == "dcgan_exp_0":
        checkpoint = "checkpoint"             # a GAN has no best epoch
    before = snapshot(exp)
    done = run_main_in_process([*run.args, *set_args(mode="export", **extra)], tmp_path)
    assert done.returncode == 0, done.stderr
    after = snapshot(exp)
    assert {path for path in after if before.get(path) != after[path]} == {"results.json", *EXPORTED}
    assert before.keys() <= after.keys()
    entry = json.loads(after["results.json"])["export"]
    assert max(entry["max_abs_difference"].values()) <= entry["tolerance"]
    assert "largest absolute difference" in done.stdout

    model, preprocess = load_trained(exp, checkpoint)
    check_files(exp, model, real_batch(name, preprocess, request))
    if name == "condensenet_exp_0":
        graph = torch.export.load(exp / "export" / "model.pt2").graph
        assert any("index_select" in str(node.target) for node in graph.nodes)   # CondensedConv's
        check_condensed_predictions(run, exp, tmp_path)


def check_condensed_predictions(run, exp, cwd):
    """The condensed network predicts what the trained one it was condensed from predicts."""
    images = cwd / "images"
    images.mkdir()
    for index, pixels in enumerate(torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8).numpy()):
        Image.fromarray(pixels).save(images / f"{index}.png")
    tables = []
    for form in ({"condensed": True}, {"checkpoint_file": "checkpoint.pth.tar"}):
        done = run_main_in_process([*run.args, *set_args(mode="predict", predict_input="images", **form)], cwd)
        assert done.returncode == 0, done.stderr
        tables.append([line.split(",") for line in (exp / "out" / "predictions.csv").read_text().splitlines()[1:]])
    condensed, trained = tables
    assert [row[:2] for row in condensed] == [row[:2] for row in trained]
    assert np.allclose(np.array([row[2:] for row in condensed], float), np.array([row[2:] for row in trained], float),
                       atol=1e-5)


def test_a_scaffolded_agent_predicts_and_exports(tmp_path, monkeypatch):
    """The files `main.py new Flowers` writes, as they are, in packages of their own under tmp_path:
    trained for an epoch on FakeData, it classifies PNG files and exports."""
    import agents
    import datasets
    import graphs.models
    from commands.new import AGENT, CONFIG, DATA, MODEL

    values = {"name": "Flowers", "module": "flowers", "title": "Flowers"}
    for package, template in ((agents, AGENT), (datasets, DATA), (graphs.models, MODEL)):
        folder = tmp_path / "generated" / package.__name__.replace(".", "_")
        folder.mkdir(parents=True)
        (folder / "flowers.py").write_text(template.substitute(values))
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    for module in ("agents.flowers", "datasets.flowers", "graphs.models.flowers"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    config = tmp_path / "flowers_exp_0.json"
    config.write_text(CONFIG.substitute(values))
    small = set_args(agent="agents.flowers:FlowersAgent", max_epoch=1, train_size=32, valid_size=16, device="cpu")
    assert run_main_in_process([config, *small], tmp_path).returncode == 0
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.full((40, 30, 3), 80 * index, dtype=np.uint8)).save(images / f"{index}.png")
    done = run_main_in_process([config, *small, *set_args(mode="predict", predict_input="images")], tmp_path)
    assert done.returncode == 0, done.stderr
    exp = tmp_path / "experiments" / "flowers_exp_0"
    rows = (exp / "out" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "input,prediction," + ",".join(str(c) for c in range(10)) and len(rows) == 4
    done = run_main_in_process([config, *small, *set_args(mode="export")], tmp_path)
    assert done.returncode == 0, done.stderr
    model, preprocess = load_trained(exp)
    check_files(exp, model, preprocess(sorted(images.iterdir())))
    for module in ("agents.flowers", "datasets.flowers", "graphs.models.flowers"):
        sys.modules.pop(module, None)


class Noisy(torch.nn.Module):
    """A layer whose output differs at every call: no export can agree with it."""

    def forward(self, x):
        return x + torch.randn_like(x)


def test_an_export_that_disagrees_is_refused_and_nothing_is_replaced(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match=r"differs from eager PyTorch by up to .* \(tolerance .*nothing was written"):
        export_verified(Noisy(), (torch.zeros(2, 3),), folder)
    assert [path.name for path in folder.iterdir()] == ["model.onnx"]
    assert (folder / "model.onnx").read_bytes() == b"an earlier export"


def test_export_before_training_and_where_it_is_no_mode(tmp_path):
    tiny = {"exp_name": "tiny", "agent": "tests.tiny_agent:TinyAgent", "mode": "export"}
    line = one_error_line(run_main_in_process([json.dumps(tiny)], tmp_path))
    assert "'mode' is \"export\"; it must be one of \"train\", \"test\"" in line
    line = one_error_line(run_main_in_process([ROOT / "configs" / "iris_exp_0.json", *set_args(mode="export")],
                                              tmp_path))
    assert "needs a trained model, but there is no" in line and "model_best.pth.tar" in line
    assert not (tmp_path / "experiments").exists()
