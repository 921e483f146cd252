"""The plugin's own tests: bdtk's conformance kit plus what is specific to CLP.

`check_purifier` and the `bdtk_*` fixtures come with bdtk (a pytest plugin), so a third-party
package needs nothing else to test against the interface contract.
"""

from __future__ import annotations

import pytest
import torch
from bdtk_clp import CLP, channel_lipschitz_bounds
from bdtk_clp.clp import conv_bn_pairs
from torch import nn

from backdoor_toolkit import DefenseData, ImageClassifier, ModelRequirementError, get_purifier
from backdoor_toolkit.testing import check_distribution, check_purifier


def test_registered_through_its_entry_point() -> None:
    assert [info.cls for info in check_distribution("bdtk-clp")] == [CLP]  # loads cleanly, alone
    assert get_purifier("clp") is CLP


@pytest.mark.parametrize("u", [3.0, 0.5])
def test_conforms(u: float, bdtk_device: torch.device) -> None:
    result = check_purifier(CLP, config={"u": u}, device=bdtk_device)
    if u == 0.5:  # a low threshold must prune something, and say so
        assert result.modified and result.diagnostics["pruned_channels"] > 0


def test_bound_is_spectral_norm_times_bn_scale() -> None:
    conv, bn = nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    bounds = channel_lipschitz_bounds(conv, bn)
    for k in range(3):
        sigma = torch.linalg.svdvals(conv.weight[k].detach().reshape(2, 9))[0]
        expected = sigma * bn.weight[k].abs() / (bn.running_var[k] + bn.eps) ** 0.5
        assert torch.isclose(bounds[k], expected.detach(), rtol=1e-5)


def test_prunes_exactly_the_outlying_channel(
    bdtk_model: ImageClassifier, bdtk_defense_data: DefenseData
) -> None:
    conv, bn = conv_bn_pairs(bdtk_model, bdtk_defense_data.spec.image_shape)[1]
    with torch.no_grad():  # make channel 5 an outlier: a huge kernel, like a trigger detector
        conv.weight[5] *= 50
    result = CLP(CLP.Config(u=3.0)).purify(bdtk_model, bdtk_defense_data)
    assert 5 in result.diagnostics["layers"][1]["pruned"]
    assert bn.weight.detach()[5] == 0.0 and bn.bias.detach()[5] == 0.0
    x = torch.rand(4, *bdtk_defense_data.spec.image_shape, device=bn.weight.device)
    seen = []
    handle = bn.register_forward_hook(lambda _m, _i, out: seen.append(out[:, 5]))
    bdtk_model.eval()(x)
    handle.remove()
    assert torch.count_nonzero(seen[0]) == 0


def test_pairs_only_convolutions_that_feed_batchnorm(bdtk_defense_data: DefenseData) -> None:
    from backdoor_toolkit import create_model

    model = create_model("wrn-16-1", bdtk_defense_data.spec)
    pairs = conv_bn_pairs(model, bdtk_defense_data.spec.image_shape)
    # pre-activation: the stem feeds the first BN, then each block's conv1 feeds its bn2
    assert len(pairs) == 1 + 6
    assert all(conv.out_channels == bn.num_features for conv, bn in pairs)


def test_model_without_batchnorm_is_refused(bdtk_defense_data: DefenseData) -> None:
    class NoBN(ImageClassifier):
        def __init__(self) -> None:
            super().__init__((0.5,), (0.5,), 4)
            self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.groups = nn.ModuleList()
            self.final = nn.Identity()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ModelRequirementError, match="BatchNorm"):
        CLP(CLP.Config()).purify(NoBN(), bdtk_defense_data)
