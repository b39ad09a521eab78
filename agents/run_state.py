"""A run's checkpoint: everything a BaseAgent's training has, gathered into one dict, and an agent
restored from one so that it goes on exactly as the uninterrupted run would have (the role of
Lightning's CheckpointConnector). The format and both directions of it are here, in one place;
the files (latest, model_best, keep-last-N, atomic writes, reading and checking a file) are
utils.checkpoint's CheckpointSaver and load_checkpoint_file.

Each entry is a plain type or a tensor, so the file loads with torch.load(weights_only=True). The
declared models, optimizers, schedulers and fp16 scaler come from the run's TrainingParts, the
best value and early stopping from its Monitor, the position inside an epoch from its
EpochProgress, the tracker state (an MLflow run id) from its Trackers; agents add their own with
the extra_state() / load_extra_state() hooks.
"""
from agents.trained import load_evaluation_weights
from utils import checkpoint as ckpt
from utils.errors import CheckpointError


def gather(agent) -> dict:
    """The checkpoint of `agent` as it is now (inside an epoch, at its end, or while validating)."""
    validating = agent.in_epoch.trained is not None
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "agent": type(agent).__name__,
        "config": ckpt.plain(agent.config),
        "epoch": agent.current_epoch - validating,     # epochs completed
        "iteration": agent.current_iteration,
        "world_size": agent.world_size,   # batch_size is per process: resuming checks the global batch
        **agent.parts.state_dict(),
        **agent.monitor.state_dict(),
        "ema": agent.ema.state_dict() if agent.ema is not None else None,
        "last_metrics": dict(agent.last_metrics),
        "wall_time_s": agent.wall_time(),
        # while validating: the state the epoch's training ended in, where the resumed run goes on
        "rng": agent.in_epoch.rng_after_training if validating else ckpt.rng_states(),
        "position": agent.in_epoch.state(agent.epoch_state),
        "extra": agent.extra_state(),
        "trackers": agent.trackers.state_dict(),   # the MLflow run id, which --resume continues
        "learning_rates": dict(agent.learning_rates),   # a resumed epoch's metrics.csv row has them
        "inference": ckpt.plain(agent.inference_info()),   # what predict and export need: a copied folder is enough
    }


def restore(agent, state: dict, training: bool):
    """Restore the models (for evaluation the EMA's weights, if the run kept one); when training
    also optimizers, schedulers, counters, the position inside the epoch and the RNG states.
    Raises CheckpointError for a checkpoint written inside an epoch by another number of processes."""
    agent.current_epoch = state["epoch"]
    agent.trackers.load_state_dict(state.get("trackers", {}))   # a test logs into the training's MLflow run
    if not training:
        load_evaluation_weights(agent.parts.models, state, agent.ema_model)
        return
    agent.parts.load_models(state)
    agent.parts.load_training(state)
    if agent.ema is not None and state.get("ema") is not None:
        agent.ema.load_state_dict(state["ema"])
    agent.current_iteration, agent.in_epoch.resumed = state["iteration"], state.get("position")
    written_by = state.get("world_size", 1)
    if agent.in_epoch.resumed is not None and written_by != agent.world_size:
        raise CheckpointError(f"the checkpoint was written inside epoch {agent.current_epoch + 1} by "
                              f"{written_by} process(es): resume it with as many (this run has "
                              f"{agent.world_size}); at an epoch's end the number may change")
    agent.monitor.load_state_dict(state)
    agent.last_metrics = dict(state.get("last_metrics", {}))
    agent.learning_rates = dict(state.get("learning_rates", {}))
    agent.wall_time_before = state.get("wall_time_s", 0.0)
    agent.load_extra_state(state.get("extra", {}))
    ckpt.set_rng_states(state["rng"])  # last: nothing after this may draw random numbers
