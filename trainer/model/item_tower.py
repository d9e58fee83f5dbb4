"""The item tower: how an item id becomes the vector the encoder reads and the next-item head scores.

``model.item_tower`` (Netflix's semantic tower for cold start):

- ``id`` (default): the item table's row (TorchRec), nothing else.
- ``semantic``: ``psi(z_i)``, an MLP over the item's metadata vector ``z_i`` (trainer/data/item_features.py);
  the ID rows take no part (they get zero gradients; the table still has one row per item, because the lookup's
  row ids are what the tower reads the metadata by).
- ``both``: ``e_i + psi(z_i)``, where ``e_i`` is the item's ID row, or a learned OOV vector for an item whose ID
  row training never updated (no interaction in the train split: a cold-start item) and, during pre-training,
  for a random ``model.cold_start_mask_rate`` share of the batch's item ids (the same ids on the input and the
  output side), so that ``oov + psi(z)`` learns to stand in for an ID row. ``psi``'s output layer starts at
  zero: at initialisation ``both`` scores warm items exactly like ``id``.

The additive form (rather than an MLP over [e_i, z_i]) is what makes the last point hold, and keeps a warm item's
ID row the dominant term a pre-trained ID model would have learned.

The metadata are data: a non-persistent buffer filled from the dataset (:func:`attach_item_data`), never saved in
checkpoints; every consumer of a model with a semantic tower (training, eval, export, fine-tuning) attaches them
from its ``--data``. The cold flags belong to the trained model (which ID rows its training never updated): drawn
from the training split when a run starts, saved with every checkpoint (``item_cold.npy``) and read back over the
dataset's by every load (:func:`load_item_cold`), so an eval, export or fine-tuning on another dataset of the same
catalog still scores the same items from metadata alone. Both sit whole on every rank (dim x 4 + 1 bytes per
item); the capacity planner does not count them (next to the item table's item_dim x 4 bytes per item, and its
optimizer state, they are small).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.interaction import SideTable
from trainer.ranking import mix64

if TYPE_CHECKING:
    from trainer.data.manifest import Manifest

ITEM_TOWERS = ("id", "semantic", "both")
COLD_NAME = "item_cold.npy"  # a checkpoint's cold flags
MASK_BITS = 24


def tower_hidden(item_dim: int) -> int:
    """Width of psi's hidden layer."""
    return 2 * item_dim


class ZeroLinear(nn.Linear):
    """A linear layer that starts at zero (initialised in ``reset_parameters``: ZeRO-3 ``zero.Init`` safe)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class SemanticItems(nn.Module):
    """psi (LayerNorm -> Linear -> GELU -> Linear) and the OOV vector; see the module docstring."""

    def __init__(self, tower: str, feature_dim: int, item_dim: int, init_std: float) -> None:
        super().__init__()
        if tower not in ("semantic", "both"):
            raise ValueError(f"model.item_tower: SemanticItems takes semantic or both, got {tower!r}")
        self.tower = tower
        hidden = tower_hidden(item_dim)
        self.norm = nn.LayerNorm(feature_dim)
        self.fc1 = nn.Linear(feature_dim, hidden)
        self.fc2 = (ZeroLinear if tower == "both" else nn.Linear)(hidden, item_dim)
        self.oov = SideTable(1, item_dim, init_std) if tower == "both" else None
        self.register_buffer("features", torch.zeros(0, feature_dim), persistent=False)
        self.register_buffer("cold", torch.zeros(0, dtype=torch.bool), persistent=False)

    def forward(self, emb: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors of table rows ``ids`` from their looked-up ID rows ``emb`` (N, item_dim); ``masked``:
        (N,) bool, rows to score from the OOV vector (``both``)."""
        if self.features.shape[0] == 0:
            raise RuntimeError(
                f"model.item_tower={self.tower}: the dataset's item features were not attached (attach_item_data)"
            )
        z = self.features[ids].to(self.fc1.weight.dtype)
        # The result keeps the lookup's dtype (fp32 from TorchRec), so the head scores in fp32 under bf16 too and
        # ``both`` at initialisation returns exactly the ID rows.
        sem = self.fc2(F.gelu(self.fc1(self.norm(z)))).to(emb.dtype)
        if self.oov is None:  # semantic: the ID rows take no part (a zero term keeps their gradients defined)
            return sem + emb * 0.0
        no_id = self.cold[ids]
        if masked is not None:
            no_id = no_id | masked
        # Read through the module call, not .weight: under ZeRO-3 a parameter is gathered only inside its forward.
        oov = self.oov(torch.zeros_like(ids[:1])).to(emb.dtype)
        return torch.where(no_id[:, None], oov.expand_as(emb), emb) + sem


def cold_start_mask(ids: torch.Tensor, salt: int, rate: float) -> torch.Tensor:
    """(N,) bool: the ids whose ID row a training step swaps for the OOV vector, a pure function of (id, salt), so
    an id is masked everywhere in the batch or nowhere; about ``rate`` of the distinct ids."""
    if rate <= 0:
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    h = mix64(ids.long() * 0x2545F491 + salt) & ((1 << MASK_BITS) - 1)
    return h < int(rate * (1 << MASK_BITS))


def semantic_items(dense: nn.Module) -> SemanticItems | None:
    """The semantic tower of a dense model (``ArgusModel`` or ``TwoTower``), None for ``item_tower: id``."""
    argus = getattr(dense, "argus", dense)
    return getattr(argus, "items", None)


def check_item_data(item_tower: str, item_features: int, item_rows: int, manifest: Manifest) -> None:
    """One line naming the dataset or setting at fault when ``manifest``'s dataset cannot feed this item tower
    (``model.item_tower``, ``model.item_features``, the table's rows); nothing for the ID tower. Checked when a run
    is loaded (trainer/run.py) and again when the data are attached."""
    from trainer.data.item_features import feature_dim, load_item_features

    if item_tower == "id":
        return
    if item_rows != manifest.num_items:
        raise ValueError(
            f"embeddings.item_rows: model.item_tower={item_tower} needs one table row per item "
            f"({manifest.num_items} in {manifest.root}), got {item_rows}; set embeddings.item_rows: 0"
        )
    dim = feature_dim(manifest)
    if dim == 0:
        load_item_features(manifest)  # its one line: the dataset has none, and how to write them
    if dim != item_features:
        raise ValueError(
            f"model.item_features: {item_features}, but the item features of {manifest.root} have dim {dim}"
        )


def attach_item_data(dense: nn.Module, manifest: Manifest, item_rows: int, split: str = "train") -> None:
    """Fill the semantic tower's buffers from the dataset: the metadata vectors, and as cold the items without an
    interaction in ``split`` (the training split; a checkpoint's own flags replace them: :func:`load_item_cold`).
    A no-op for the ID tower. One line naming the dataset or setting at fault when they cannot describe this
    model's items."""
    from trainer.data.item_features import cold_items, load_item_features

    tower = semantic_items(dense)
    if tower is None:
        return
    check_item_data(tower.tower, tower.features.shape[1], item_rows, manifest)
    feats = load_item_features(manifest)
    dev = tower.fc1.weight.device
    dtype = tower.fc1.weight.dtype if tower.fc1.weight.is_floating_point() else torch.float32
    tower.features = torch.from_numpy(feats.astype("float32", copy=True)).to(device=dev, dtype=dtype)
    tower.cold = torch.from_numpy(cold_items(manifest, split)).to(dev)


def save_item_cold(dense: nn.Module, checkpoint: Path) -> None:
    """Write the semantic tower's cold flags into directory ``checkpoint``; nothing for the ID tower."""
    tower = semantic_items(dense)
    if tower is not None and tower.cold.numel():
        np.save(checkpoint / COLD_NAME, tower.cold.cpu().numpy())


def load_item_cold(dense: nn.Module, checkpoint: Path) -> None:
    """Replace the attached cold flags by those checkpoint ``checkpoint`` trained with (none saved: the dataset's
    stay, as for a checkpoint of an ID-tower run)."""
    tower = semantic_items(dense)
    path = Path(checkpoint) / COLD_NAME
    if tower is None or not path.is_file():
        return
    cold = np.load(path)
    if tower.cold.numel() and cold.shape != tuple(tower.cold.shape):
        raise ValueError(
            f"{path}: cold flags for {cold.shape[0]} items, but the dataset attached has {tower.cold.shape[0]}"
        )
    tower.cold = torch.from_numpy(cold.astype(bool)).to(tower.cold.device)


def share_item_data(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (a copy of the dense model ``src``) the same attached item data."""
    a, b = semantic_items(src), semantic_items(dst)
    if a is not None and b is not None:
        b.features, b.cold = a.features, a.cold
