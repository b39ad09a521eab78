"""Experience replay for off-policy agents (DQN): a circular buffer of transitions in preallocated
tensors, sampled uniformly by its own torch.Generator, so a resumed run draws the same batches."""
import torch


class ReplayMemory:
    """(observation, action, reward, next observation, terminated) transitions; once `capacity`
    are stored, each new one overwrites the oldest.

    observation_dtype: storage type of the observations (torch.float16 halves the memory of
    pixel observations); sample() always returns float32.
    """

    def __init__(self, capacity: int, observation_shape: tuple, observation_dtype: torch.dtype = torch.float32,
                 seed: int = 0):
        if capacity < 1:
            raise ValueError(f"replay memory capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.observations = torch.zeros((capacity, *observation_shape), dtype=observation_dtype)
        self.next_observations = torch.zeros_like(self.observations)
        self.actions = torch.zeros(capacity, dtype=torch.int64)
        self.rewards = torch.zeros(capacity, dtype=torch.float32)
        self.terminated = torch.zeros(capacity, dtype=torch.float32)   # 1: no bootstrapping from next
        self.position = 0     # where the next transition goes
        self.size = 0         # transitions stored, at most capacity
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def push(self, observation, action: int, reward: float, next_observation, terminated: bool):
        i = self.position
        self.observations[i] = torch.as_tensor(observation)
        self.next_observations[i] = torch.as_tensor(next_observation)
        self.actions[i] = action
        self.rewards[i] = reward
        self.terminated[i] = float(terminated)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> tuple:
        """(observations (B, *shape) float32, actions (B,) int64, rewards (B,), next observations
        (B, *shape) float32, terminated (B,)), drawn uniformly with replacement."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay memory")
        index = torch.randint(0, self.size, (batch_size,), generator=self.generator)
        return (self.observations[index].float(), self.actions[index], self.rewards[index],
                self.next_observations[index].float(), self.terminated[index])

    def state_dict(self, transitions: bool = True) -> dict:
        """Counters and the sampling generator; with `transitions` also the stored transitions
        (only the filled part, copied: saving a view would save the whole buffer)."""
        state = {"capacity": self.capacity, "position": self.position, "size": self.size,
                 "generator": self.generator.get_state()}
        if transitions:
            filled = slice(0, self.size)
            state["transitions"] = {name: getattr(self, name)[filled].clone()
                                    for name in ("observations", "actions", "rewards", "next_observations",
                                                 "terminated")}
        return state

    def load_state_dict(self, state: dict):
        """Without stored transitions (a checkpoint written with transitions=False) the memory
        starts empty, and fills again before learning resumes."""
        self.generator.set_state(state["generator"])
        stored = state.get("transitions")
        if stored is None:
            self.position = self.size = 0
            return
        if state["capacity"] != self.capacity:
            raise ValueError(f"the saved replay memory holds {state['capacity']} transitions, "
                             f"this one {self.capacity}")
        size = state["size"]
        for name, values in stored.items():
            getattr(self, name)[:size] = values
        self.position, self.size = state["position"], size
