"""Reference rows: a floor and a ceiling for every table, so the metrics' behaviour is visible.

- ``identity`` returns the source unchanged (resized to the target's shape if it differs).
- ``keypoint-nn`` returns the target of the guiding pair whose source is nearest in pixel space:
  everything it knows comes from the K guiding pairs.
- ``label-oracle`` returns a random target training image of the source's own class. It reads
  labels, which no real method may, and is marked as an oracle in every table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.api import SEMI_PAIRED, UNPAIRED, BenchError, Method


def _match_shape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if x.dim() == 4 and len(shape) == 3:
        y = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
        if y.shape[1] != shape[0]:
            y = y.mean(1, keepdim=True).expand(-1, shape[0], -1, -1)
        return y.contiguous()
    raise BenchError(f"identity cannot map source shape {tuple(x.shape[1:])} to target shape {shape}")


class Identity(Method):
    name = "identity"
    family = "Reference"
    settings = (UNPAIRED, SEMI_PAIRED)
    # references: no training, so the README's table has one seed where the output is deterministic
    readme_label = "identity (reference: the source unchanged)"
    readme_grids = "the MNIST sources themselves"
    notes = "returns the source (floor: how far source already is from target)"
    state_attrs = ()  # nothing is learned: setup records the target shape (extra_state)
    test_options: dict = {}

    @property
    def nfe(self) -> int:
        return 0

    def setup(self, data, run):
        self.extra_state = {"shape": list(data.shape)}

    def fit(self, data, run):
        pass

    @torch.no_grad()
    def transport(self, x, generator=None):
        return _match_shape(x, tuple(self.extra_state["shape"])).clone()


class KeypointNN(Method):
    name = "keypoint-nn"
    family = "Reference"
    settings = (SEMI_PAIRED,)
    uses_pairs = True
    readme_label = "keypoint-nn (reference: the target of the guiding pair whose source is nearest)"
    readme_grids = "each output one of the ten guiding Chinese numerals"
    notes = ("target of the guiding pair whose source is nearest (uses only the K pairs); semi-paired tasks only")
    state_attrs = ()  # nothing is learned: setup copies the guiding pairs from the data
    test_options: dict = {}

    @property
    def nfe(self) -> int:
        return 0

    def setup(self, data, run):
        self.pair_sources = data.pairs[0].clone()
        self.pair_targets = data.pairs[1].clone()

    def fit(self, data, run):
        pass

    @torch.no_grad()
    def transport(self, x, generator=None):
        d = torch.cdist(x.flatten(1).float(), self.pair_sources.flatten(1).float())
        return self.pair_targets[d.argmin(1)].clone()


class LabelOracle(Method):
    name = "label-oracle"
    family = "Reference"
    settings = (UNPAIRED, SEMI_PAIRED)
    stochastic = True
    oracle = True
    readme_label = "label-oracle (ceiling; reads labels: a random target training image of the source's class)"
    readme_grids = "real Chinese numerals of the source's class"
    notes = ("ORACLE: a random target training sample of the source's class (reads labels); refused on tasks "
             "without class labels (the gauss-* and convex-* ground truths)")
    # nothing is learned: the labelled sources and the target pool are the task's data, rebuilt by setup (saving
    # them wrote every training image into each checkpoint)
    state_attrs = ()
    test_options: dict = {}

    @property
    def nfe(self) -> int:
        return 0

    def setup(self, data, run):
        if data.source_train_labels is None or data.target_train_labels is None:
            raise BenchError(f"label-oracle needs class labels, which task {data.name!r} does not provide")
        # Labels of every source the task knows (train and test); a query is labelled by its nearest
        # known source, which is the source itself for the task's own test images.
        parts = [data.source_train, data.source_test]
        labels = [data.source_train_labels, data.source_test_labels]
        keep = [i for i, lab in enumerate(labels) if lab is not None]
        self.known_sources = torch.cat([parts[i] for i in keep]).flatten(1).float()
        self.known_labels = torch.cat([labels[i] for i in keep]).long()
        self.targets = data.target_train.clone()
        self.target_labels = data.target_train_labels.long().clone()

    def fit(self, data, run):
        pass

    def _labels_of(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).float()
        best = torch.full((len(x),), float("inf"), device=x.device)
        idx = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for start in range(0, len(self.known_sources), 8192):
            block = self.known_sources[start:start + 8192]
            d = torch.cdist(flat, block)
            val, arg = d.min(1)
            better = val < best
            best = torch.where(better, val, best)
            idx = torch.where(better, arg + start, idx)
        return self.known_labels[idx]

    @torch.no_grad()
    def transport(self, x, generator=None):
        labels = self._labels_of(x)
        out = torch.empty((len(x), *self.targets.shape[1:]), dtype=self.targets.dtype, device=x.device)
        for c in labels.unique():
            rows = (labels == c).nonzero().squeeze(1)
            pool = (self.target_labels == c).nonzero().squeeze(1)
            if len(pool) == 0:
                raise BenchError(f"label-oracle: no target sample of class {int(c)}")
            pick = torch.randint(len(pool), (len(rows),), generator=generator, device=generator.device if generator is not None else "cpu")
            out[rows] = self.targets[pool[pick.to(pool.device)]]
        return out
