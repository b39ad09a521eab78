"""Using a trained model: load_trained() for a user's own script, the rebuilding of a checkpoint's
networks that it shares with mode=predict and mode=export, and ClassifiesImages, what the image
classifiers (MNIST, CondenseNet, a scaffolded agent) share for those two modes.

    from agents.trained import load_trained
    model, preprocess = load_trained("experiments/mnist_exp_0")
    probabilities = model(preprocess("digit.png")).softmax(dim=1)        # (1, 10)
    print(preprocess.class_names[probabilities.argmax()])

An agent takes part through the hooks of TrainedModelHooks (a base of BaseAgent): networks() (its
networks from a config and a checkpoint's "inference" entry), inference_info() (that entry: input
size, normalisation, class names), input_transform() (the preprocess of that entry), and for the
two modes predict() and export_target().
"""
from pathlib import Path

import torch

from utils import checkpoint as ckpt
from utils.checkpoint import TrainingParts
from utils.errors import CheckpointError
from utils.export import ExportTarget, export_verified
from utils.training import EMA

SUFFIX = ".pth.tar"
# Modes that use a trained model: they build its networks alone (no data set, no optimizer) and
# write only their own output (out/, export/) and their entry in results.json.
USING_MODES = ("predict", "export")


class TrainedModelHooks:
    """What BaseAgent has for using a trained model. predict, export and load_trained rebuild an
    agent's networks from a checkpoint alone: its config and the "inference" entry that
    inference_info() filled when it was saved."""

    @classmethod
    def networks(cls, config, inference: dict) -> dict:
        """{checkpoint name: module} of the networks a trained model is used through (the first is
        "the model"), built from the training run's config and a checkpoint's inference entry."""
        raise NotImplementedError(f"{cls.__name__} does not say how to rebuild its networks (networks())")

    def inference_info(self) -> dict:
        """What using the trained model needs besides its weights (input size and channels,
        normalisation, class names), saved in every checkpoint; plain types only."""
        return {}

    @classmethod
    def input_transform(cls, inference: dict, device="cpu"):
        """The callable from the agent's raw inputs to the batch the model takes (load_trained's preprocess)."""
        raise NotImplementedError(f"{cls.__name__} defines no input transform (input_transform())")

    def export_target(self):
        """utils.export.ExportTarget: the module mode=export writes, and the inputs it is traced on."""
        raise NotImplementedError(f"{type(self).__name__} has no export_target()")

    def build_networks(self, checkpoint: dict):
        """predict and export: the checkpoint's networks as load_trained rebuilds them (from the
        config they were trained with), declared, and set as attributes of their names."""
        _, trained = trained_config(checkpoint)
        self.inference = inference_entry(checkpoint)
        for name, module in rebuild_networks(type(self), trained, self.inference).items():
            self.add_model(name, module)
            setattr(self, name, self.parts.models[name])

    def record_predictions(self, names: list, probabilities: torch.Tensor, class_names: list, noun: str):
        """A classifier's predict: out/predictions.csv, results.json's entry, a short table in the log."""
        from utils.predict import prediction_table, write_predictions

        self.mode_results = {**write_predictions(self.paths.out / "predictions.csv", names, probabilities,
                                                 class_names), "epoch": self.current_epoch}
        self.logger.info(f"{len(names):,} {noun} classified by the model of epoch {self.current_epoch}; "
                         f"{self.mode_results['predictions']}:\n"
                         + prediction_table(names, probabilities, class_names))

    def export(self):
        """export/model.onnx (torch.onnx, dynamo exporter) and export/model.pt2 (torch.export) of
        export_target(), each checked against eager PyTorch on a batch before it is kept."""
        target = self.export_target()
        results = export_verified(target.module, target.example, self.paths.export, target.dynamic_shapes,
                                  target.check, inference=self.inference)
        self.mode_results = {**results, "epoch": self.current_epoch}
        differences = ", ".join(f"{name} {value:.2g}" for name, value in results["max_abs_difference"].items())
        self.logger.info(f"exported the model of epoch {self.current_epoch} to {results['onnx']} and {results['pt2']}; "
                         f"on a batch of {results['check_shapes'][0][0]} against eager PyTorch, the largest absolute "
                         f"difference: {differences} (tolerance {results['tolerance']:.1g})")


def load_trained(experiment, checkpoint: str = "model_best", device="cpu"):
    """(model, preprocess) of a trained experiment folder, without creating, writing or touching any
    of its files, nor changing the caller's random number generators.

    model: the agent's network (a DCGAN's generator, a DQN's policy network) in eval mode on
    `device`, with the weights of checkpoints/<checkpoint>.pth.tar (the EMA weights when the run
    averaged them). checkpoint: a name in checkpoints/ ("model_best", "checkpoint", "condensed",
    "epoch_0003") or a path to a .pth.tar file. preprocess: a callable from the agent's inputs
    (image paths or PIL images; rows of measurements; ...) to the batch the model takes, on
    `device`, converted as the training data were; it has .class_names where the model classifies."""
    state = ckpt.load(checkpoint_path(experiment, checkpoint))
    agent_class, config = trained_config(state)
    inference = inference_entry(state)
    device = torch.device(device)
    networks = rebuild_networks(agent_class, config, inference)
    load_evaluation_weights(networks, state, agent_class.ema_model)
    model = next(iter(networks.values())).to(device).eval()
    return model, agent_class.input_transform(inference, device)


def checkpoint_path(experiment, checkpoint: str) -> Path:
    """checkpoint: a file name in <experiment>/checkpoints/ (".pth.tar" may be left out), or a path
    with a folder in it, as checkpoint_file takes them."""
    if len(Path(checkpoint).parts) > 1:
        return Path(checkpoint)
    if not Path(experiment).is_dir():
        raise CheckpointError(f"there is no experiment folder '{experiment}' (the folder under experiments/ "
                              "that a training run made)")
    folder = Path(experiment) / "checkpoints"
    name = checkpoint if checkpoint.endswith(SUFFIX) else checkpoint + SUFFIX
    if not (folder / name).is_file():
        there = sorted(p.name[:-len(SUFFIX)] for p in folder.glob("*" + SUFFIX)) if folder.is_dir() else []
        raise CheckpointError(f"no checkpoint '{checkpoint}' in '{folder}' ("
                              + (f"it has: {', '.join(there)}" if there else "it has none: train first") + ")")
    return folder / name


def trained_config(state: dict):
    """(agent class, config) of the run that wrote the checkpoint: its own config, saved in it."""
    from agents import get_agent_class
    from utils.config import resolve

    config = state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("agent"), str):
        raise CheckpointError("the checkpoint holds no config naming its agent; it was not written by this framework")
    agent_class = get_agent_class(config["agent"])
    return agent_class, resolve(config, agent_class.config_spec(), agent_class.__name__)


def inference_entry(state: dict) -> dict:
    inference = state.get("inference")
    if not inference:
        source = f"from {state.get('agent', '?')}, epoch {state.get('epoch', '?')}"
        raise CheckpointError(f"the checkpoint ({source}) has no \"inference\" entry (what predicting needs: "
                              "input size, normalisation, class names); "
                              "it was saved before checkpoints held one, or its agent defines no inference_info(): "
                              "train it again")
    return inference


def rebuild_networks(agent_class, config, inference: dict) -> dict:
    """{name: module} as agent_class.networks() builds them. Their random initialisation (replaced by
    the checkpoint's weights) draws from torch's generator: the caller's state is put back after."""
    with torch.random.fork_rng(devices=[]):
        return agent_class.networks(config, inference)


def load_evaluation_weights(networks: dict, state: dict, ema_model: str | None):
    """The checkpoint's weights into `networks`; those of the averaged model when the run kept an EMA
    (of ema_model, or of the run's first model): what evaluating, predicting and exporting use."""
    parts = TrainingParts()
    parts.models = networks
    parts.load_models(state)
    averaged = ema_model or next(iter(state["models"]))
    if state.get("ema") is not None and averaged in networks:
        networks[averaged].load_state_dict(EMA.averaged_weights(state["ema"]))


class ClassifiesImages:
    """For an agent whose model maps (B, C, H, W) images to (B, classes) logits and whose
    inference_info() is utils.predict.image_inference(...): mode=predict classifies the images
    predict_input names into out/predictions.csv and prints a table; mode=export exports the
    model; load_trained's preprocess is an ImageTransform."""

    @classmethod
    def input_transform(cls, inference: dict, device="cpu"):
        from utils.predict import ImageTransform

        return ImageTransform(inference["channels"], inference["size"], inference["mean"], inference["std"], device,
                              inference["class_names"])

    def predict(self):
        from utils.predict import IMAGE_EXTENSIONS, class_probabilities, input_files

        files = input_files(self.config.predict_input, IMAGE_EXTENSIONS, "images")
        transform = self.input_transform(self.inference, self.device)
        images = torch.stack([transform.tensor(file) for file in files])   # every file read before any is written
        probabilities = class_probabilities(self.model, images, self.device)
        names = [str(file) for file in files]
        self.record_predictions(names, probabilities, transform.class_names, "images")

    def export_target(self):
        """The classifier, traced on a batch of 2 images of random pixels."""
        transform = self.input_transform(self.inference, self.device)
        return ExportTarget(self.model, (transform.random_batch(2),))
