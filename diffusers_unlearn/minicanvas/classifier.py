"""Small CNN classifiers that name the style or the object of a MiniCanvas image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = ["ConceptClassifier", "ConceptClassifierNet", "images_to_tensor"]


def images_to_tensor(images: Sequence[Image.Image] | torch.Tensor, size: int) -> torch.Tensor:
    """PIL images, or a float tensor ``[B, 3, H, W]`` in [0, 1], as a float tensor ``[B, 3, size, size]`` in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image tensor of shape [B, 3, H, W], got {tuple(images.shape)}")
        if x.shape[-2:] != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
        return x.clamp(0.0, 1.0)
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected PIL images or a tensor, got {type(img).__name__}")
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BOX if img.width > size else Image.Resampling.BILINEAR)
        arrays.append(np.asarray(img, np.float32) / 255.0)
    if not arrays:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class ConceptClassifierNet(nn.Module):
    """A plain CNN: three conv stages (32 -> 16 -> 8 -> 4 px), global average pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * width * 2, num_classes))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads, ``[B, F]``, for images ``x`` in [0, 1]."""
        h = self.features(x * 2.0 - 1.0)
        # Mean pooling sees texture statistics (style); max pooling keeps where parts are (object).
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``x`` in [0, 1], shape ``[B, 3, H, W]``."""
        return self.head(self.pooled(x))


class ConceptClassifier:
    """A trained MiniCanvas classifier as a callable: ``classifier(images) -> list[str]`` of label names.

    ``images`` is a list of PIL images or a float tensor ``[B, 3, H, W]`` in [0, 1]; images of another size are
    resized to ``resolution``. This is the ``images -> labels`` interface the evaluation and ``ClassifierCheck``
    take; ``minicanvas.load_classifiers()`` returns the shipped ones.

    Args:
        net: the network (put in eval mode).
        labels: the label name of each output class, in order.
        resolution: the image side the network was trained at.
        domain: what it names (``"style"`` or ``"object"``), for messages.
    """

    def __init__(self, net: ConceptClassifierNet, labels: Sequence[str], resolution: int = 32,
                 domain: str = "") -> None:
        self.net = net.eval()
        self.labels = list(labels)
        self.resolution = int(resolution)
        self.domain = domain

    @property
    def device(self) -> torch.device:
        """Where the network's weights are."""
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> ConceptClassifier:
        """Move the network to ``device``; images are moved there when classified.

        Args:
            device: a torch device or its name.

        Returns:
            The classifier itself.
        """
        self.net.to(device)
        return self

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Raw class logits.

        Args:
            images: PIL images or a ``[B, 3, H, W]`` tensor in [0, 1].
            batch_size: images per forward pass.

        Returns:
            ``[B, len(labels)]`` float32 on the CPU.

        Raises:
            ValueError: a tensor of another shape.
            TypeError: a sequence item that is not a PIL image.
        """
        x = images_to_tensor(images, self.resolution)
        out = [self.net(x[i : i + batch_size].to(self.device)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Pooled image features: what a Fréchet distance between image sets compares.

        Args:
            images: PIL images or a ``[B, 3, H, W]`` tensor in [0, 1].
            batch_size: images per forward pass.

        Returns:
            ``[B, F]`` float32 on the CPU.
        """
        x = images_to_tensor(images, self.resolution)
        out = [self.net.pooled(x[i : i + batch_size].to(self.device)).float().cpu()
               for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.net.head[-1].in_features)

    def predict_indices(self, images: Sequence[Image.Image] | torch.Tensor) -> list[int]:
        """The index of the most likely label of each image.

        Args:
            images: PIL images or a ``[B, 3, H, W]`` tensor in [0, 1].

        Returns:
            One index into ``labels`` per image.
        """
        return self.logits(images).argmax(dim=1).tolist()

    def __call__(self, images: Sequence[Image.Image] | torch.Tensor) -> list[str]:
        """The most likely label name of each image.

        Args:
            images: PIL images or a ``[B, 3, H, W]`` tensor in [0, 1].

        Returns:
            One label name per image.
        """
        return [self.labels[i] for i in self.predict_indices(images)]

    def __repr__(self) -> str:
        return f"ConceptClassifier(domain={self.domain!r}, labels={len(self.labels)}, resolution={self.resolution})"
