"""CartPole's rendered screen as a pixel observation, as in the PyTorch DQN tutorial: the band of
rows that holds the cart and the pole, a window around the cart, resized small.

Works on the frame the environment renders (a numpy array); it never imports gymnasium or pygame.
"""
import numpy as np
import torch
import torch.nn.functional as F

BAND = (0.4, 0.8)      # rows kept, as fractions of the frame height: the cart and the pole
VIEW_WIDTH = 0.6       # width of the window around the cart, as a fraction of the frame width


def screen_size(frame_height: int, frame_width: int, height: int) -> tuple[int, int]:
    """(rows, columns) of crop_screen's output for a frame of this size: a 400x600 CartPole frame
    resized to 40 rows gives 40x90."""
    band_rows = int(frame_height * BAND[1]) - int(frame_height * BAND[0])
    return height, round(int(frame_width * VIEW_WIDTH) * height / band_rows)


def cart_column(cart_position: float, x_threshold: float, frame_width: int) -> int:
    """The pixel column of the cart's centre: the renderer maps [-x_threshold, x_threshold] onto
    the frame's width."""
    scale = frame_width / (2 * x_threshold)
    return int(cart_position * scale + frame_width / 2.0)


def crop_screen(frame: np.ndarray, cart_position: float, x_threshold: float, height: int) -> torch.Tensor:
    """(H, W, 3) uint8 frame -> (3, height, width) float32 in [0, 1]."""
    frame_height, frame_width, _ = frame.shape
    band = frame[int(frame_height * BAND[0]):int(frame_height * BAND[1])]
    view = int(frame_width * VIEW_WIDTH)
    # The window follows the cart, and stops at the frame's edges.
    left = cart_column(cart_position, x_threshold, frame_width) - view // 2
    left = min(max(left, 0), frame_width - view)
    window = torch.from_numpy(np.ascontiguousarray(band[:, left:left + view]))   # (rows, view, 3) uint8
    window = window.permute(2, 0, 1).unsqueeze(0).float().div_(255)               # (1, 3, rows, view)
    size = screen_size(frame_height, frame_width, height)
    return F.interpolate(window, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)
