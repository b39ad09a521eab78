"""DQN (Mnih et al. 2015) on a gymnasium environment, CartPole-v1 by default.

The loop is environment steps, not a data set: an epoch is `eval_every` training episodes, each
step acting epsilon-greedily, storing the transition in the replay memory and taking a gradient
step on a uniform batch from it (Huber loss against a target network, double DQN by default);
validate() is a greedy evaluation that picks model_best; training ends after `max_steps`
environment steps. Observations are CartPole's 4 numbers (an MLP) or, in pixel mode, the
difference of two cropped screens (a conv net), as in the PyTorch DQN tutorial.
"""
import importlib
import math
import os

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import optim

from agents.base import BaseAgent
from datasets.cartpole_screen import crop_screen, screen_size
from graphs.models.dqn import ConvQNetwork, MLPQNetwork
from utils.config import Key
from utils.errors import CheckpointError, ConfigError, UserError
from utils.export import ExportTarget
from utils.replay_memory import ReplayMemory

VALIDATION, TEST = 1, 2     # streams of evaluation start states


def exploration_rate(step: int, eps_start: float, eps_end: float, eps_decay: float) -> float:
    """Epsilon after `step` environment steps: from eps_start down to eps_end, exponentially with
    time constant eps_decay (steps): 5 * eps_decay steps go 99% of the way."""
    return eps_end + (eps_start - eps_end) * math.exp(-step / eps_decay)


@torch.no_grad()
def update_target(target_net: torch.nn.Module, policy_net: torch.nn.Module, tau: float):
    """target <- tau * policy + (1 - tau) * target, parameters and batch-norm statistics; tau 1 is
    an exact copy (a hard update)."""
    for target, source in zip(target_net.state_dict().values(), policy_net.state_dict().values()):
        if tau == 1.0 or not target.is_floating_point():
            target.copy_(source)
        else:
            target.lerp_(source, tau)


def episode_seeds(seed: int, stream: int, count: int) -> list[int]:
    """Reset seeds of `count` evaluation episodes: the same at every evaluation, so networks are
    compared on the same start states, and different per stream (validation, test)."""
    return np.random.SeedSequence([seed, stream]).generate_state(count).tolist()


def require_pygame(purpose: str):
    """pygame renders gymnasium's classic-control screens; imported only when pixels are needed."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")          # an rgb_array render needs no window
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        importlib.import_module("pygame")
    except ImportError:
        raise ConfigError(f"{purpose} needs pygame to render the screen, and it is not installed; "
                          "pip install pygame (requirements.txt has it)") from None


class Observations:
    """Observations (one, or a list / array of them) -> the (N, *observation_shape) float32 batch the
    policy network takes, on `device` (load_trained's preprocess for a DQN)."""

    def __init__(self, observation_shape, device="cpu"):
        self.shape, self.device = tuple(observation_shape), torch.device(device)

    def __call__(self, observations) -> torch.Tensor:
        batch = torch.as_tensor(np.asarray(observations, dtype=np.float32))
        return batch.reshape(-1, *self.shape).to(self.device)


class ScreenDifference(gym.Wrapper):
    """CartPole with pixel observations: the cropped screen after the step minus the one before it
    (zeros right after a reset), (3, H, W) float32 in [-1, 1]. One frame holds no velocity; the
    difference of two does."""

    def __init__(self, env: gym.Env, height: int):
        super().__init__(env)
        self.height = height
        rows, columns = screen_size(env.unwrapped.screen_height, env.unwrapped.screen_width, height)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3, rows, columns), np.float32)
        self.last_screen = None

    def screen(self) -> torch.Tensor:
        cartpole = self.env.unwrapped
        return crop_screen(self.env.render(), float(cartpole.state[0]), cartpole.x_threshold, self.height)

    def reset(self, **kwargs):
        _, info = self.env.reset(**kwargs)
        self.last_screen = self.screen()
        return np.zeros(self.observation_space.shape, np.float32), info

    def step(self, action):
        _, reward, terminated, truncated, info = self.env.step(action)
        screen = self.screen()
        difference = (screen - self.last_screen).numpy()
        self.last_screen = screen
        return difference, reward, terminated, truncated, info


class DQNAgent(BaseAgent):
    DEFAULTS = {
        "env_name": "CartPole-v1",
        "observation_mode": Key("state", choices=("state", "pixels")),
        "hidden_sizes": [256, 256],     # state mode: the MLP's hidden layers
        "conv_filters": [16, 32, 32],   # pixel mode: the three convolutions
        "screen_height": Key(40, minimum=1),          # pixel mode: rows of the resized crop (40 -> 40x90)
        "max_steps": Key(100_000, minimum=1),         # environment steps of training: the budget that ends it
        "max_epoch": 10_000,            # an epoch is eval_every episodes; max_steps ends training first
        "memory_capacity": Key(50_000, minimum=1),    # transitions in the replay memory
        "checkpoint_replay_memory": True,   # false: resume refills the memory (pixel mode: it is big)
        # transitions in memory before the first gradient step: from batch_size to memory_capacity
        "learning_starts": Key(1_000, minimum=1),
        "train_frequency": Key(1, minimum=1),         # environment steps per gradient step
        "batch_size": Key(128, minimum=1),
        "learning_rate": Key(1e-3, minimum=0),        # Adam
        "gamma": Key(0.99, minimum=0, maximum=1),
        "eps_start": Key(1.0, minimum=0, maximum=1),
        "eps_end": Key(0.01, minimum=0, maximum=1),
        # time constant of the exponential decay, in environment steps; above 0 (check_config)
        "eps_decay": Key(5_000.0, minimum=0),
        "target_update": Key(1, minimum=1),           # gradient steps between target-network updates
        # each update: target <- tau * policy + (1 - tau) * target; 1.0: a copy; above 0 (check_config)
        "tau": Key(0.005, minimum=0, maximum=1),
        "double_dqn": True,             # the policy net picks the next action, the target net values it
        "grad_clip": 10.0,              # max gradient norm (BaseAgent's key); null: no clipping
        "eval_every": Key(10, minimum=1),      # training episodes per epoch; each ends in a greedy evaluation
        "eval_episodes": Key(10, minimum=1),   # greedy episodes of each evaluation
        "test_episodes": Key(100, minimum=1),  # mode=test
        "log_interval": 100,            # gradient steps between loss / mean Q scalars
        "monitor": "val/mean_return",
        "monitor_mode": "max",
    }
    metrics = ("mean_return", "std_return")
    modes = ("train", "test", "export")
    resumable_keys = BaseAgent.resumable_keys + ("max_steps",)   # the training budget, like max_epoch
    epoch_unit = "episodes"
    unsupported_keys = dict.fromkeys(
        ("grad_accumulation", "fast_dev_run", "limit_train_batches", "limit_val_batches", "overfit_batches"),
        "DQN learns from environment steps, not from the batches of a data set (lower max_steps for a short run)")

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if not config.batch_size <= config.learning_starts <= config.memory_capacity:
            raise ConfigError(f"learning_starts ({config.learning_starts}) must lie between batch_size "
                              f"({config.batch_size}) and memory_capacity ({config.memory_capacity})")
        # Bounds a Key's inclusive minimum cannot say:
        if config.tau == 0:
            raise ConfigError("config key 'tau' must be above 0 (1: copy the policy net), got 0")
        if config.eps_decay == 0:
            raise ConfigError("config key 'eps_decay' must be above 0 (environment steps), got 0")
        for key in ("hidden_sizes", "conv_filters"):
            if not config[key] or not all(isinstance(n, int) and n >= 1 for n in config[key]):
                raise ConfigError(f"config key '{key}' must be a list of positive integers, got {config[key]}")
        if config.validate_every != 1:
            raise ConfigError("DQNAgent evaluates after every epoch of eval_every episodes; "
                              "set eval_every instead of validate_every")
        if config.amp != "off":
            raise ConfigError("DQNAgent trains in float32; set amp to \"off\"")
        try:   # an unknown id, or an environment whose own dependencies are missing
            env = gym.make(config.env_name)
        except gym.error.Error as e:
            raise ConfigError(f"env_name \"{config.env_name}\": {e}") from None
        action_space, observation_shape = env.action_space, env.observation_space.shape
        env.close()
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ConfigError(f"DQN needs a discrete action space; {config.env_name} has {action_space}")
        if config.observation_mode == "state" and len(observation_shape) != 1:
            raise ConfigError(f"observation_mode \"state\" needs vector observations; {config.env_name} has "
                              f"shape {observation_shape}")
        if config.observation_mode == "pixels":
            if not config.env_name.startswith("CartPole"):
                raise ConfigError("observation_mode \"pixels\" crops the screen around CartPole's cart; "
                                  f"use it with CartPole, not \"{config.env_name}\"")
            require_pygame("observation_mode \"pixels\"")

    def build(self):
        cfg = self.config
        if self.world_size > 1:
            raise UserError("DQNAgent runs in one process; start it without torchrun")
        self.pixels = cfg.observation_mode == "pixels"
        self.eval_env = self.make_env()
        space = self.eval_env.observation_space
        self.num_actions = int(self.eval_env.action_space.n)
        self.policy_net = self.add_model("policy_net", self.make_q_network(space.shape))
        target_net = self.make_q_network(space.shape)
        target_net.load_state_dict(self.policy_net.state_dict())
        self.target_net = self.add_model("target_net", target_net.requires_grad_(False).eval())
        self.optimizer = self.add_optimizer("optimizer", optim.Adam(self.policy_net.parameters(), cfg.learning_rate))

        self.env_steps = 0       # environment steps taken in training
        self.episodes = 0        # training episodes finished
        self.returns = []        # of the current epoch's episodes
        if cfg.mode == "train":
            self.env = self.make_env()
            self.env_seeded = False          # the first reset seeds the environment, later ones continue it
            # Exploration draws from its own generator; a checkpoint holds its state.
            self.rng = np.random.default_rng(cfg.seed)
            self.memory = ReplayMemory(cfg.memory_capacity, space.shape,
                                       torch.float16 if self.pixels else torch.float32, seed=cfg.seed)

    def make_env(self, render: bool = False) -> gym.Env:
        cfg = self.config
        env = gym.make(cfg.env_name, render_mode="rgb_array" if render or self.pixels else None)
        return ScreenDifference(env, cfg.screen_height) if self.pixels else env

    def make_q_network(self, observation_shape: tuple) -> torch.nn.Module:
        return self.q_network(self.config, observation_shape, self.num_actions)

    @staticmethod
    def q_network(config, observation_shape, num_actions: int) -> torch.nn.Module:
        if config.observation_mode == "pixels":
            channels, height, width = observation_shape
            return ConvQNetwork(channels, height, width, num_actions, config.conv_filters)
        return MLPQNetwork(observation_shape[0], num_actions, config.hidden_sizes)

    @classmethod
    def networks(cls, config, inference):
        """The policy network alone: the greedy action is its argmax."""
        return {"policy_net": cls.q_network(config, inference["observation_shape"], inference["num_actions"])}

    def inference_info(self):
        space = self.eval_env.observation_space
        return {"input": "observation", "env_name": self.config.env_name,
                "observation_mode": self.config.observation_mode, "observation_shape": list(space.shape),
                "num_actions": self.num_actions}

    @classmethod
    def input_transform(cls, inference, device="cpu"):
        return Observations(inference["observation_shape"], device)

    def export_target(self):
        """The policy network on 2 observations (uniform in [-1, 1]: a screen difference's range)."""
        shape = self.inference["observation_shape"]
        example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return ExportTarget(self.policy_net, (example.to(self.device),))

    # ------------------------------------------------------------------ training

    def epsilon(self) -> float:
        cfg = self.config
        return exploration_rate(self.env_steps, cfg.eps_start, cfg.eps_end, cfg.eps_decay)

    def training_done(self) -> bool:
        return self.env_steps >= self.config.max_steps

    def train_one_epoch(self):
        returns = self.returns              # of this epoch's episodes (a resumed epoch's so far too)
        while len(returns) < self.config.eval_every and not self.training_done():
            self.safe_point(len(returns))   # between episodes: a Ctrl+C waits for the episode's end
            returns.append(self.play_training_episode())
        if self.training_done():
            self.logger.info(f"max_steps reached: {self.env_steps:,} environment steps, {self.episodes:,} "
                             f"episodes, {self.current_iteration:,} gradient steps")
        return {"train/mean_return": float(np.mean(returns)) if returns else math.nan,
                "train/env_steps": self.env_steps, "train/epsilon": self.epsilon()}

    def play_training_episode(self) -> float:
        """One episode of epsilon-greedy play, learning as it goes; cut short at max_steps."""
        cfg = self.config
        observation, _ = self.env.reset(seed=None if self.env_seeded else cfg.seed)
        self.env_seeded = True
        episode_return, length = 0.0, 0
        while True:
            action = self.select_action(observation, self.epsilon())
            next_observation, reward, terminated, truncated, _ = self.env.step(action)
            self.env_steps += 1
            # Only termination stops bootstrapping: a time-limit cut is not the end of the task.
            self.memory.push(observation, action, reward, next_observation, terminated)
            observation = next_observation
            episode_return += float(reward)
            length += 1
            if len(self.memory) >= cfg.learning_starts and self.env_steps % cfg.train_frequency == 0:
                self.optimize_policy()
            if terminated or truncated or self.training_done():
                break
        self.episodes += 1
        self.log_scalars({"train/episode_return": episode_return, "train/episode_length": length,
                          "train/epsilon": self.epsilon()}, self.env_steps)
        return episode_return

    def select_action(self, observation, epsilon: float) -> int:
        explore = self.rng.random() < epsilon
        return int(self.rng.integers(self.num_actions)) if explore else self.greedy_action(observation)

    @torch.no_grad()
    def greedy_action(self, observation) -> int:
        self.policy_net.eval()
        observation = torch.as_tensor(observation, dtype=torch.float32, device=self.device)
        q_values = self.policy_net(observation.unsqueeze(0))                  # (1, actions)
        return int(q_values.argmax())

    def optimize_policy(self):
        """One gradient step on a batch from the replay memory, then the target-network update."""
        cfg = self.config
        states, actions, rewards, next_states, terminated = self.to_device(self.memory.sample(cfg.batch_size))
        self.policy_net.train()
        q_values = self.policy_net(states).gather(1, actions.unsqueeze(1)).squeeze(1)   # Q(s, a), (B,)
        with torch.no_grad():
            next_target = self.target_net(next_states)                        # (B, actions)
            if cfg.double_dqn:   # the policy net picks the next action, the target net values it
                next_actions = self.policy_net(next_states).argmax(1, keepdim=True)
                next_q = next_target.gather(1, next_actions).squeeze(1)
            else:
                next_q = next_target.max(1).values
            targets = rewards + cfg.gamma * (1.0 - terminated) * next_q
        loss = F.smooth_l1_loss(q_values, targets)                             # Huber
        self.optimizer_step(loss, self.optimizer)
        if self.current_iteration % cfg.target_update == 0:
            update_target(self.target_net, self.policy_net, cfg.tau)
        if self.current_iteration % cfg.log_interval == 0:
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise UserError(f"training diverged: the loss is {loss_value} at environment step "
                                f"{self.env_steps}; lower learning_rate (the last checkpoint is kept)")
            self.log_scalars({"train/loss": loss_value, "train/mean_q": float(q_values.detach().mean())},
                             self.env_steps)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def play_greedy(self, env: gym.Env, seeds: list, frames: list | None = None) -> list[float]:
        """The return of one greedy episode per reset seed; the rendered frames of the first go
        into `frames` when it is given."""
        returns = []
        for index, seed in enumerate(seeds):
            observation, _ = env.reset(seed=seed)
            recording = frames is not None and index == 0
            if recording:
                frames.append(env.render())
            episode_return, done = 0.0, False
            while not done:
                observation, reward, terminated, truncated, _ = env.step(self.greedy_action(observation))
                episode_return += float(reward)
                done = terminated or truncated
                if recording:
                    frames.append(env.render())
            returns.append(episode_return)
        return returns

    def validate(self):
        returns = self.play_greedy(self.eval_env, episode_seeds(self.config.seed, VALIDATION,
                                                                self.config.eval_episodes))
        return {"val/mean_return": float(np.mean(returns)), "val/std_return": float(np.std(returns))}

    def test(self):
        """test_episodes greedy episodes of model_best; the first also saved as out/test_episode.gif
        when the screen can be rendered."""
        cfg = self.config
        seeds = episode_seeds(cfg.seed, TEST, cfg.test_episodes)
        env, frames = self.eval_env, []
        if not self.pixels:   # the pixel-mode environment renders already
            try:
                require_pygame("the test episode's GIF")
                env = self.make_env(render=True)
            except ConfigError as e:
                self.logger.warning(f"{e}; no GIF")
                frames = None
        returns = self.play_greedy(env, seeds, frames)
        if frames:
            self.save_gif(frames, self.paths.out / "test_episode.gif", env.metadata.get("render_fps", 50))
        self.mode_results = {"episodes": len(returns), "mean_return": float(np.mean(returns)),
                             "std_return": float(np.std(returns))}
        self.log_scalars({f"test/{name}": self.mode_results[name] for name in ("mean_return", "std_return")},
                         self.current_epoch)
        self.logger.info(f"test of the model from epoch {self.current_epoch}: {len(returns)} greedy episodes, "
                         f"return {self.mode_results['mean_return']:.1f} +- {self.mode_results['std_return']:.1f} "
                         f"(min {min(returns):.0f}, max {max(returns):.0f})")

    def save_gif(self, frames: list, path, fps: float):
        """Frames at half size, one per environment step, looping."""
        images = [Image.fromarray(frame).reduce(2) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        self.logger.info(f"wrote {path} ({len(images) - 1} steps)")

    # ------------------------------------------------------------------ state

    def epoch_state(self):
        return {"returns": list(self.returns)}

    def load_epoch_state(self, state):
        self.returns = list(state["returns"]) if state else []

    def results(self) -> dict:
        if not hasattr(self, "env_steps"):    # export builds the policy network alone, without build()
            return super().results()
        return {**super().results(), "env_steps": self.env_steps, "episodes": self.episodes}

    def extra_state(self):
        return {"env_steps": self.env_steps, "episodes": self.episodes,
                "exploration_rng": self.rng.bit_generator.state,
                "env_rng": self.env.unwrapped.np_random.bit_generator.state,
                "memory": self.memory.state_dict(transitions=self.config.checkpoint_replay_memory)}

    def load_extra_state(self, state):
        self.env_steps, self.episodes = state["env_steps"], state["episodes"]
        self.rng.bit_generator.state = state["exploration_rng"]
        # The next reset continues the environment's random stream instead of reseeding it.
        self.env.unwrapped.np_random.bit_generator.state = state["env_rng"]
        self.env_seeded = True
        try:
            self.memory.load_state_dict(state["memory"])
        except ValueError as e:
            raise CheckpointError(f"{e}: resume with the memory_capacity it was trained with") from None
        if len(self.memory) < self.config.learning_starts:
            self.logger.info(f"replay memory: {len(self.memory):,} transitions; learning pauses until it "
                             f"holds learning_starts ({self.config.learning_starts:,})")
