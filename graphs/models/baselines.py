"""The PyTorch Cookiecutter's baseline networks, for any task with flat (or flattened) inputs.

  linear     one Linear layer: logistic regression
  mlp        Linear -> ReLU -> Linear
  mlp_fixed  the same MLP with its hidden layer frozen at its random initialisation, so only the
             output layer learns: a random-features model, the floor a trained hidden layer must beat
"""
from torch import nn

NETWORKS = ("linear", "mlp", "mlp_fixed")
INITS = ("default", "xavier")


def build_baseline(network: str, in_features: int, num_classes: int, hidden_size: int = 64,
                   init: str = "default") -> nn.Module:
    """(B, *) inputs flattened to (B, in_features) -> logits (B, num_classes)."""
    if network == "linear":
        model = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    elif network in ("mlp", "mlp_fixed"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden_size), nn.ReLU(),
                              nn.Linear(hidden_size, num_classes))
    else:
        raise ValueError(f"unknown baseline network {network!r}; choose one of {', '.join(NETWORKS)}")
    initialize(model, init)
    if network == "mlp_fixed":
        model[1].requires_grad_(False)
    return model


def initialize(model: nn.Module, init: str = "default") -> nn.Module:
    """"default" keeps PyTorch's initialisation (Kaiming-uniform weights); "xavier" draws the weights
    of every Linear and Conv layer from Glorot & Bengio's uniform distribution, biases zero."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if init == "xavier":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model
