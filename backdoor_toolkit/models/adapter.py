"""Any PyTorch classifier as a bdtk `ImageClassifier`: what `--model torchvision:NAME` and
`--model MODULE:FACTORY` build, and what `backdoor_toolkit.purify` wraps a plain `nn.Module` in.

Defenses reach inside a model only through `features`, `fc`, `layer_groups`, `final`/`final_maps`
and `batchnorms` (see base.py). For a network bdtk did not build, the adapter derives what it can
and says why it cannot derive the rest, so that a defense needing it refuses with that reason
(`check_capabilities`) instead of failing inside its own code:

- **features**: the input of the last `nn.Linear` (captured with a forward pre-hook), or the
  flattened output of a module the user names (`feature_layer`); `fc` is that last Linear. MCLDef
  computes logits as `fc(features(x))`, so the pair counts only once `verify` has checked on real
  images that it reproduces the network's output (a Linear that is not the last operation, or a
  named layer whose output is not what the Linear reads, would silently train the wrong thing).
- **batchnorm**: every `nn.BatchNorm2d` in the network; ANP hooks them wherever they sit.
- **layer groups** (NAD) and **final maps** (fine-pruning) cannot be read off an arbitrary graph:
  they are reported missing.

Normalisation stays the model's first layer (mean/std as given; none means the network sees
pixels in [0, 1]), so triggers live in pixel space as they do for zoo models.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import BdtkError, ModelRequirementError, UnknownNameError
from .base import Capability, ImageClassifier

#: `--model torchvision:NAME`: a torchvision classification model, built with `weights=None`.
TORCHVISION_PREFIX = "torchvision:"


class AdaptedClassifier(ImageClassifier):
    """An arbitrary classifier `net` behind bdtk's model interface (see the module docstring).

    `state_dict()` holds `normalize.*` and `net.*`; `network_state()` is the network's own state
    dict, the one its architecture loads, and what `bdtk purify` writes.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        feature_layer: str | None = None,
        architecture: str = "",
    ) -> None:
        super().__init__(mean or (0.0,), std or (1.0,), num_classes=0)
        self.net = net
        self.architecture = architecture or type(net).__name__
        self.normalized = mean is not None or std is not None
        linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
        #: Path of the last nn.Linear inside `net` ("" when there is none).
        self.fc_name = linears[-1] if linears else ""
        self.feature_layer = feature_layer
        if feature_layer is not None:
            _submodule(net, feature_layer, "--feature-layer")  # a misspelt name fails here, listing names
        if self.fc_name:
            self.num_classes = int(self._linear().out_features)
        self._verified: bool | None = None  # None: not checked on images yet
        self._notes: dict[Capability, str] = {}
        if not self.fc_name:
            self._notes[Capability.FEATURES] = (
                f"{self.architecture} has no nn.Linear, so neither its penultimate features nor an `fc` "
                "that maps them to logits can be found."
            )
        self._notes[Capability.LAYER_GROUPS] = (
            f"the stages of {self.architecture} cannot be derived from an arbitrary network; use a zoo "
            "model (`bdtk models`) for this defense."
        )
        self._notes[Capability.FINAL_MAPS] = (
            f"the last convolutional maps of {self.architecture} cannot be derived from an arbitrary "
            "network; use a zoo model (`bdtk models`) for this defense."
        )
        if not self.batchnorms():
            self._notes[Capability.BATCHNORM] = f"{self.architecture} has no nn.BatchNorm2d layer."

    # --- what defenses reach --------------------------------------------------------------------

    def _linear(self) -> nn.Linear:
        module = self.net.get_submodule(self.fc_name)
        assert isinstance(module, nn.Linear)
        return module

    @property
    def fc(self) -> nn.Linear:  # type: ignore[override]
        """The last nn.Linear of the network (looked up each time, so copies stay consistent)."""
        if not self.fc_name:
            raise ModelRequirementError(self._notes[Capability.FEATURES])
        return self._linear()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def features(self, x: Tensor) -> Tensor:
        """The penultimate representation, captured on the way through one forward pass."""
        if Capability.FEATURES not in self.capabilities():
            raise ModelRequirementError(f"No features: {self._notes[Capability.FEATURES]}")
        captured: list[Tensor] = []
        if self.feature_layer is None:

            def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                captured.append(args[0])

            handle = self._linear().register_forward_pre_hook(pre_hook)
        else:

            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                captured.append(output)

            handle = self.net.get_submodule(self.feature_layer).register_forward_hook(hook)
        try:
            self.forward(x)
        finally:
            handle.remove()
        if not captured:
            where = self.feature_layer or self.fc_name
            raise ModelRequirementError(f"{self.architecture}: module {where!r} never ran in forward().")
        return torch.flatten(captured[-1], 1)

    def final_maps(self, x: Tensor) -> Tensor:
        raise ModelRequirementError(self._notes[Capability.FINAL_MAPS])

    def layer_groups(self) -> list[nn.Module]:
        raise ModelRequirementError(self._notes[Capability.LAYER_GROUPS])

    def capabilities(self) -> set[Capability]:
        caps = set()
        if self.fc_name and self._verified is not False:
            caps.add(Capability.FEATURES)
        if self.batchnorms():
            caps.add(Capability.BATCHNORM)
        return caps

    def capability_notes(self) -> dict[Capability, str]:
        return {c: note for c, note in self._notes.items() if c not in self.capabilities()}

    def network_state(self) -> dict[str, Tensor]:
        """The wrapped network's own state dict (no `net.` prefix, no normalisation buffers)."""
        return self.net.state_dict()

    # --- checking the feature path on real images -----------------------------------------------

    @torch.no_grad()
    def verify(self, images: Tensor) -> Tensor:
        """Run the network on a few float images in [0, 1]; return its logits.

        Checks that `fc(features(x))` reproduces the output; if it does not, `features` is
        withdrawn from the capabilities with the reason (a defense that needs it then refuses).
        """
        was_training = self.training
        self.eval()
        try:
            x = images.to(next(self.parameters()).device)
            logits = self.forward(x)
            if self.fc_name:
                self._verified = True  # so that `features` runs
                try:
                    again = self.fc(self.features(x))
                    same = again.shape == logits.shape and torch.allclose(again, logits, rtol=1e-4, atol=1e-4)
                    detail = "" if same else f"gives {tuple(again.shape)} instead of the output's"
                except RuntimeError as exc:
                    same, detail = False, f"fails ({' '.join(str(exc).split())[:120]})"
                self._verified = same
                if not same:
                    source = (
                        f"the output of {self.feature_layer!r}"
                        if self.feature_layer
                        else f"the input of {self.fc_name!r}"
                    )
                    self._notes[Capability.FEATURES] = (
                        f"its last nn.Linear {self.fc_name!r} applied to {source} does not reproduce the "
                        f"network's output ({detail or 'different values'}); name the layer whose "
                        "output that Linear reads with --feature-layer (feature_layer=...)."
                    )
            if logits.dim() == 2:
                self.num_classes = int(logits.shape[1])
            return logits
        finally:
            self.train(was_training)

    def describe(self) -> list[str]:
        """One line per capability: what the adapter found, or why it is missing."""
        caps = self.capabilities()
        if Capability.FEATURES in caps:
            source = (
                f"output of {self.feature_layer!r}" if self.feature_layer else f"input of {self.fc_name!r}"
            )
            verified = "" if self._verified else " (not yet checked on images)"
            lines = [f"features: the {source}, fc: {self.fc_name!r}{verified}"]
        else:
            lines = [f"features: not available ({self._notes[Capability.FEATURES]})"]
        bns = len(self.batchnorms())
        lines.append(
            f"batchnorm: {bns} BatchNorm2d layers"
            if bns
            else f"batchnorm: not available ({self._notes[Capability.BATCHNORM]})"
        )
        lines.append("layer groups (NAD), final maps (fine-pruning): not available for an adapted model")
        return lines


def adapt(
    net: nn.Module,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    feature_layer: str | None = None,
    architecture: str = "",
) -> ImageClassifier:
    """`net` as an ImageClassifier: a zoo model as it is (its normalisation is already inside; a
    mean/std given here replaces it), anything else wrapped in an `AdaptedClassifier`."""
    if isinstance(net, ImageClassifier):
        if feature_layer is not None:
            raise BdtkError(
                f"feature_layer={feature_layer!r} is for models bdtk did not build; "
                f"{type(net).__name__} is a bdtk model with its own features."
            )
        if mean is not None or std is not None:
            set_normalization(net, mean, std)
        return net
    return AdaptedClassifier(net, mean, std, feature_layer=feature_layer, architecture=architecture)


def set_normalization(
    model: ImageClassifier, mean: Sequence[float] | None, std: Sequence[float] | None
) -> None:
    """Replace the first layer's mean and std (either may be left as it is)."""
    for name, values in (("mean", mean), ("std", std)):
        if values is not None:
            setattr(model.normalize, name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))


def _submodule(net: nn.Module, name: str, option: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n]
        raise UnknownNameError(f"module ({option})", name, names[-40:]) from None


def input_channels(net: nn.Module) -> int | None:
    """The image channels the network reads: its first Conv2d's `in_channels` (None without one)."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None


# --- architectures outside the zoo ---------------------------------------------------------------


def torchvision_names() -> list[str]:
    """torchvision's classification models (not detection, segmentation, video or quantized)."""
    from torchvision import models

    return list(models.list_models(module=models))


def torchvision_network(name: str, num_classes: int | None = None) -> nn.Module:
    """A torchvision classification model, randomly initialised (`weights=None`: nothing is ever
    downloaded); `num_classes` None keeps torchvision's default (1000)."""
    from torchvision import models

    known = torchvision_names()
    if name not in known:
        raise UnknownNameError("torchvision classification model", name, known)
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)  # one output, and no scipy-slow init
    return models.get_model(name, **kwargs)


def torchvision_num_classes(name: str, state: dict[str, Tensor]) -> int | None:
    """The class count a torchvision model's state dict was made for, read from the file.

    The head's tensors are those whose shape changes with `num_classes`; two models built on the
    meta device (no memory, no init) tell which they are and along which dimension.
    """
    with torch.device("meta"):
        a = torchvision_network(name, 1000).state_dict()
        b = torchvision_network(name, 1001).state_dict()
    for key, tensor in a.items():
        if tensor.shape != b[key].shape and key in state and state[key].dim() == tensor.dim():
            dim = next(i for i, (x, y) in enumerate(zip(tensor.shape, b[key].shape, strict=True)) if x != y)
            return int(state[key].shape[dim])
    return None


def factory_network(spec: str) -> nn.Module:
    """`MODULE:FACTORY` (or `path/to/file.py:FACTORY`): import it and call it with no arguments.

    The current directory is searched first, as `python -m` does, so a user's own `nets.py` works.
    """
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise BdtkError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. 'mynets:make_model'.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise BdtkError(f"--model {spec!r}: {path} is not a file.")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or loader_spec.loader is None:
                raise BdtkError(f"--model {spec!r}: cannot import {path}.")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            added = "" not in sys.path and str(Path.cwd()) not in sys.path
            if added:
                sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(str(Path.cwd()))
    except BdtkError:
        raise
    except Exception as exc:  # the user's module may raise anything while importing
        raise BdtkError(
            f"--model {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise BdtkError(f"--model {spec!r}: {module_name!r} has no callable {attr!r}.")
    try:
        net = factory()
    except Exception as exc:
        raise BdtkError(f"--model {spec!r}: {attr}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise BdtkError(f"--model {spec!r}: {attr}() returned {type(net).__name__}, not an nn.Module.")
    return net
