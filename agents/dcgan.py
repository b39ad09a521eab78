"""DCGAN: a generator and a discriminator trained against each other, as in Radford et al. 2016
(Adam 2e-4, betas 0.5/0.999, batch norm, a fixed noise batch to watch progress)."""
import torch
import torch.nn.functional as F
from torch import optim
from torchvision.utils import make_grid, save_image

from agents.base import LATEST, BaseAgent
from datasets.images import CHANNELS, DATA_MODES, DATASETS, ImageDataLoader
from graphs.models.dcgan_discriminator import Discriminator
from graphs.models.dcgan_generator import Generator, doublings
from utils.config import Key
from utils.data import DATA_LOADER_KEYS
from utils.errors import ConfigError
from utils.export import ExportTarget


class DCGANAgent(BaseAgent):
    DEFAULTS = {
        **DATA_LOADER_KEYS,
        "dataset": Key("folder", choices=DATASETS),
        "data_folder": "data/celeba",
        "data_mode": Key("download", choices=DATA_MODES),
        "image_size": Key(64, minimum=16),                 # a power of two
        "input_channels": Key(3, choices=CHANNELS),
        "g_input_size": Key(100, minimum=1),               # length of the latent vector z
        "num_filt_g": Key(64, minimum=1),
        "num_filt_d": Key(64, minimum=1),
        "relu_slope": Key(0.2, minimum=0, maximum=1),      # the discriminator's leaky ReLU
        "batch_size": Key(128, minimum=1),
        "learning_rate": Key(2e-4, minimum=0),
        "beta1": Key(0.5, minimum=0, maximum=1),           # Adam's; below 1 (check_config)
        "beta2": Key(0.999, minimum=0, maximum=1),
        # one-sided: real images are labelled 1 - label_smoothing
        "label_smoothing": Key(0.0, minimum=0, maximum=1),
        "max_epoch": 5,
        "num_samples": Key(64, minimum=1),                 # images in each sample grid
        "interpolation_steps": Key(10, minimum=2),         # mode=generate: images between two latent points
        "interpolations": Key(8, minimum=1),               # mode=generate: rows of the interpolation grid
        "monitor": None,              # a GAN's losses do not say which epoch is best
    }
    modes = ("train", "generate", "export")
    ema_model = "netG"      # with "ema": samples and mode=generate come from the averaged generator
    unsupported_keys = {"grad_accumulation": "its generator's backward pass also fills the discriminator's "
                                             "gradients, which accumulating would add to the next step"}

    @classmethod
    def checkpoint_for_mode(cls, config):
        return LATEST

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        try:
            doublings(config.image_size)
        except ValueError:
            raise ConfigError(f"config key 'image_size' must be a power of two (16, 32, 64, ...), "
                              f"got {config.image_size}") from None
        for key in ("beta1", "beta2"):
            if config[key] >= 1:
                raise ConfigError(f"config key '{key}' must be below 1 (Adam's betas are in [0, 1)), "
                                  f"got {config[key]}")

    @classmethod
    def networks(cls, config, inference):
        """The generator alone: it is what a trained GAN is used through."""
        return {"netG": Generator(latent_size=config.g_input_size, num_filters=config.num_filt_g,
                                  channels=config.input_channels, image_size=config.image_size)}

    def inference_info(self):
        cfg = self.config   # the generator maps (B, latent, 1, 1) standard normal noise to images in [-1, 1]
        return {"input": "latent", "latent_size": cfg.g_input_size, "image_size": cfg.image_size,
                "channels": cfg.input_channels, "output_range": [-1.0, 1.0]}

    @classmethod
    def input_transform(cls, inference, device="cpu"):
        return LatentNoise(inference["latent_size"], device)

    def export_target(self):
        """The generator on 2 latent vectors."""
        return ExportTarget(self.netG, (self.input_transform(self.inference, self.device).seeded(2),))

    def build(self):
        cfg = self.config
        self.netG = self.add_model("netG", self.networks(cfg, {})["netG"])
        self.netD = self.add_model("netD", Discriminator(num_filters=cfg.num_filt_d, channels=cfg.input_channels,
                                                         image_size=cfg.image_size, relu_slope=cfg.relu_slope))
        betas = (cfg.beta1, cfg.beta2)
        self.optimizerG = self.add_optimizer("optimizerG", optim.Adam(self.netG.parameters(), cfg.learning_rate,
                                                                      betas=betas))
        self.optimizerD = self.add_optimizer("optimizerD", optim.Adam(self.netD.parameters(), cfg.learning_rate,
                                                                      betas=betas))
        self.fixed_noise = torch.randn(cfg.num_samples, cfg.g_input_size, 1, 1, device=self.device)
        self.load_epoch_state(None)
        if cfg.mode == "train":
            self.data_loader = ImageDataLoader(
                data_folder=cfg.data_folder, dataset=cfg.dataset, data_mode=cfg.data_mode,
                image_size=cfg.image_size, input_channels=cfg.input_channels, batch_size=cfg.batch_size,
                workers=cfg.data_loader_workers, pin_memory=cfg.pin_memory, device=self.device)

    def noise(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.config.g_input_size, 1, 1, device=self.device)   # (B, latent, 1, 1)

    def train_one_epoch(self):
        cfg = self.config
        self.train_mode(True)
        batches = self.train_batches(self.data_loader.train_loader)
        for real, _ in self.progress(batches, desc=f"epoch {self.current_epoch + 1}", leave=False,
                                     total=len(batches), initial=batches.start):
            real = self.to_device(real)
            batch = real.shape[0]
            real_target = torch.full((batch,), 1.0 - cfg.label_smoothing, device=self.device)

            # Discriminator: real images -> real, generated ones -> fake.
            with self.autocast():
                fake = self.netG(self.noise(batch))                      # (B, C, S, S)
                real_logits = self.netD(real)
                fake_logits = self.netD(fake.detach())
                loss_d = (F.binary_cross_entropy_with_logits(real_logits, real_target)
                          + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
            self.optimizer_step(loss_d, self.optimizerD, last=False)

            # Generator: make the (just updated) discriminator call its images real, the paper's
            # non-saturating form: maximise log D(G(z)).
            with self.autocast():
                fooled_logits = self.netD(fake)
                loss_g = F.binary_cross_entropy_with_logits(fooled_logits, torch.ones_like(fooled_logits))
            self.optimizer_step(loss_g, self.optimizerG)

            self.totals += torch.stack([loss_d.detach(), loss_g.detach()]).float()
            if self.current_iteration % cfg.log_interval == 0:
                with torch.no_grad():
                    self.log_scalars({"train/loss_d": float(loss_d), "train/loss_g": float(loss_g),
                                      "train/d_x": float(real_logits.sigmoid().mean()),     # D on real images
                                      "train/d_g_z": float(fake_logits.sigmoid().mean())},  # D on generated ones
                                     self.current_iteration)
        with self.evaluation_weights():       # the EMA generator's samples, with "ema"
            self.write_samples(f"epoch_{self.current_epoch + 1:03d}.png", self.current_epoch + 1)
        loss_d_mean, loss_g_mean = (self.totals / max(len(batches), 1)).tolist()
        self.load_epoch_state(None)      # the next epoch sums afresh
        return {"train/epoch_loss_d": loss_d_mean, "train/epoch_loss_g": loss_g_mean}

    def epoch_state(self):
        return {"totals": self.totals.cpu()}

    def load_epoch_state(self, state):
        # summed loss_d, loss_g of the epoch so far
        self.totals = state["totals"].to(self.device) if state else torch.zeros(2, device=self.device)

    def validate(self):
        return {}

    @torch.no_grad()
    def write_samples(self, file_name: str, step: int):
        """The fixed noise batch through the generator: to TensorBoard and to out/."""
        self.train_mode(False)
        images = self.netG(self.fixed_noise).float().cpu()      # (N, C, S, S) in [-1, 1]
        self.train_mode(True)
        grid = make_grid(images, nrow=8, normalize=True, value_range=(-1, 1))
        self.log_images("samples", grid, step)
        if self.keeps_files:
            save_image(grid, self.paths.out / file_name)

    @torch.no_grad()
    def generate(self):
        """New samples and interpolations between random latent points, from the checkpoint."""
        cfg = self.config
        self.train_mode(False)
        samples = self.netG(self.noise(cfg.num_samples)).float().cpu()
        save_image(samples, self.paths.out / "generated.png", nrow=8, normalize=True, value_range=(-1, 1))
        start, end = self.noise(cfg.interpolations), self.noise(cfg.interpolations)
        weights = torch.linspace(0, 1, cfg.interpolation_steps, device=self.device).view(1, -1, 1, 1, 1)
        path = start.unsqueeze(1) * (1 - weights) + end.unsqueeze(1) * weights    # (rows, steps, latent, 1, 1)
        frames = self.netG(path.flatten(0, 1)).float().cpu()
        save_image(frames, self.paths.out / "interpolation.png", nrow=cfg.interpolation_steps, normalize=True,
                   value_range=(-1, 1))
        self.mode_results = {"samples": str(self.paths.out / "generated.png"),
                             "interpolation": str(self.paths.out / "interpolation.png"),
                             "epoch": self.current_epoch}
        self.logger.info(f"wrote {self.mode_results['samples']} and {self.mode_results['interpolation']} "
                         f"(generator of epoch {self.current_epoch})")

    def extra_state(self):
        return {"fixed_noise": self.fixed_noise.cpu()}

    def load_extra_state(self, state):
        if "fixed_noise" in state:
            self.fixed_noise = state["fixed_noise"].to(self.device)


class LatentNoise:
    """The generator's input (load_trained's preprocess for a DCGAN): a count -> that many standard
    normal latent vectors, or given vectors (N, latent) -> shaped (N, latent, 1, 1), on `device`."""

    def __init__(self, latent_size: int, device="cpu"):
        self.latent_size, self.device = latent_size, torch.device(device)

    def __call__(self, count_or_vectors, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(count_or_vectors, int):
            vectors = torch.randn(count_or_vectors, self.latent_size, generator=generator)
        else:
            vectors = torch.as_tensor(count_or_vectors, dtype=torch.float32)
        return vectors.reshape(-1, self.latent_size, 1, 1).to(self.device)     # (N, latent, 1, 1)

    def seeded(self, count: int) -> torch.Tensor:
        """`count` vectors from a generator of their own: torch's global one is left as it is."""
        return self(count, torch.Generator().manual_seed(0))
