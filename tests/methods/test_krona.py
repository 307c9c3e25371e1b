"""DiffuseKronA-specific behaviour: the SD1.5 count, the vec trick, the paper's init, LyCORIS splits, peft LoKr."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difftune as dt
from difftune.methods.krona import KronAAdapter, lycoris_factorization
from difftune.methods.plugin import plugin_for
from difftune.methods.verbs import hosts
from difftune.testing import build_on_meta, randomize_adapter, sd15_unet_config


def _sd15_meta():
    from diffusers import UNet2DConditionModel

    return build_on_meta(UNet2DConditionModel, sd15_unet_config())


def test_sd15_unet_default_qkvo_parameter_count():
    unet = _sd15_meta()
    names = dt.inject(unet, dt.KronAConfig())  # (a1, a2) = (64, 8) on to_q/to_k/to_v/to_out.0
    assert len(names) == 128
    assert dt.trainable_parameter_count(unet) == 248_176
    # per layer a1·a2 + (d_out/a1)(d_in/a2): e.g. attn2.to_k of the first block is 768 → 320
    host = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    adapter = host.adapters["default"]
    assert adapter.krona_A.shape == (64, 8) and adapter.krona_B.shape == (5, 96)


def test_inspect_cli_prints_the_sd15_count(capsys):
    from difftune.cli import main

    assert main(["inspect", "--architecture", "sd15", "--method", "krona"]) == 0
    out = capsys.readouterr().out
    assert "248,176" in out and "128" in out
    assert main(["inspect", "--architecture", "sd15", "--method", "krona", "--set", "a1=32"]) == 0
    assert "398,048" in capsys.readouterr().out  # (32, 8): the methods.md §2(c) table


def _random_adapter(layer: nn.Module, **kwargs) -> KronAAdapter:
    adapter = KronAAdapter(layer, dt.KronAConfig(target_modules=["x"], **kwargs))
    with torch.no_grad():
        adapter.krona_B.normal_()
    return adapter


@pytest.mark.parametrize("layout", ["canonical", "official"])
@pytest.mark.parametrize(
    ("layer", "x", "a1", "a2"),
    [
        (nn.Linear(40, 24), torch.randn(2, 7, 40), 4, 8),  # attention-style 3-D input
        (nn.Linear(40, 24), torch.randn(5, 40), 6, 2),  # a1 > a2 and a1 < a2 both exercised
        (nn.Conv2d(12, 8, 1), torch.randn(2, 12, 5, 5), 4, 3),  # SD1.5 proj_in/proj_out are 1×1 convs
        (nn.Conv2d(6, 9, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9), 3, 2),
        (nn.Conv2d(6, 9, 3, padding=1, padding_mode="reflect"), torch.randn(6, 7, 7), 3, 3),  # unbatched
    ],
)
def test_vec_trick_equals_materialized_kron(layer, x, a1, a2, layout):
    adapter = _random_adapter(layer, a1=a1, a2=a2, scale=0.7, layout=layout)
    dw = adapter.delta_weight(layer.weight)
    assert dw.shape == layer.weight.shape
    want = layer._conv_forward(x, dw, None) if isinstance(layer, nn.Conv2d) else F.linear(x, dw)
    torch.testing.assert_close(adapter.delta(x, layer, {"weight": layer.weight}), want, atol=1e-5, rtol=0)


def test_delta_weight_is_the_canonical_kronecker_product():
    adapter = _random_adapter(nn.Linear(12, 6), a1=3, a2=4, scale=2.0)
    a, b = adapter.krona_A.detach(), adapter.krona_B.detach()
    dw = adapter.delta_weight(None)  # W0 plays no part in KronA's ΔW
    torch.testing.assert_close(dw, 2.0 * torch.kron(a, b), atol=0, rtol=0)
    b1, b2 = b.shape
    for q, p, r, s in [(0, 0, 0, 0), (2, 1, 3, 2), (1, 0, 2, 1)]:  # row q·b1 + p, column r·b2 + s
        assert dw[q * b1 + p, r * b2 + s] == 2.0 * a[q, r] * b[p, s]
    official = _random_adapter(nn.Linear(12, 6), a1=3, a2=4, layout="official")
    with torch.no_grad():
        official.krona_A.copy_(a)
        official.krona_B.copy_(b)
    dw_official = official.delta_weight(None)
    for q in range(3):
        for p in range(b1):
            torch.testing.assert_close(dw_official[p * 3 + q], dw[q * b1 + p] / 2.0, atol=0, rtol=0)


def test_init_is_the_papers_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(512, 256)
    x = torch.randn(3, 512)
    before = layer(x)
    net = nn.Sequential(layer)
    dt.inject(net, dt.KronAConfig(a1=64, a2=64, target_modules=["0"]))
    adapter = net[0].adapters["default"]
    assert torch.count_nonzero(adapter.krona_B) == 0
    std = adapter.krona_A.std().item()
    assert abs(std - 1 / 64) < 0.1 / 64  # A ~ N(0, 1/a1²): 4096 samples estimate the std to about 1%
    torch.testing.assert_close(net(x), before, atol=0, rtol=0)


def test_bad_factors_name_the_layer_and_suggest_divisors():
    unet = _sd15_meta()
    with pytest.raises(dt.DifftuneError) as err:
        dt.inject(unet, dt.KronAConfig(a1=48, a2=7))
    msg = str(err.value)
    assert "'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'" in msg
    assert "(320, 320)" in msg and "a1=48" in msg and "40 or 64" in msg and "a2=7" in msg and "5 or 8" in msg
    assert "factor_mode: lycoris" in msg
    assert not list(hosts(unet))  # nothing was injected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"a1": 0}, "a1"), ({"a2": "8"}, "a2"), ({"a1": 2.5}, "a1"), ({"scale": 0.0}, "scale"),
     ({"scale": float("nan")}, "scale"), ({"factor_mode": "auto"}, "factor_mode"), ({"layout": "shuffled"}, "layout"),
     ({"factor": 4}, "factor"), ({"factor_mode": "lycoris", "factor": 0}, "factor"),
     ({"factor_mode": "lycoris", "a1": 32}, "a1/a2"), ({"target_modules": []}, "target_modules")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(dt.DifftuneError, match=f"`{field}`"):
        dt.KronAConfig(**kwargs)


def test_lycoris_factorization_matches_the_package():
    from lycoris.functional.general import factorization

    for dim in [1, 7, 8, 24, 64, 127, 250, 320, 360, 640, 768, 1024, 1280, 2048]:
        for factor in [-1, 1, 2, 3, 4, 8, 16, 64, 100]:
            assert lycoris_factorization(dim, factor) == factorization(dim, factor), (dim, factor)


def test_lycoris_mode_splits_each_layer_like_lycoris():
    from lycoris.functional.general import factorization

    unet = _sd15_meta()
    dt.inject(unet, dt.KronAConfig(factor_mode="lycoris", factor=8))
    for _, host in hosts(unet):
        layer, adapter = host.base_layer, host.adapters["default"]
        want = (factorization(layer.out_features, 8)[0], factorization(layer.in_features, 8)[0])
        assert adapter.krona_A.shape == want


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(48, 32)
        self.proj = nn.Conv2d(16, 24, 1)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)

    def forward(self, x, img, img2):
        return self.lin(x), self.proj(img), self.conv(img2)


@pytest.mark.parametrize("factor", [-1, 4])
def test_equals_peft_lokr_where_peft_can_express_the_split(factor):
    """peft LoKr with full factors (r large enough), alpha = r (scale 1) and the same decompose_factor.

    peft's ``factorization`` equals LyCORIS's when factor² <= dim (for larger factors peft keeps (factor, dim/factor)
    where LyCORIS swaps to the smaller side first), so every dimension here is >= 16.
    """
    from peft import LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict

    torch.manual_seed(0)
    ours, theirs = Net(), Net()
    theirs.load_state_dict(ours.state_dict())
    inputs = (torch.randn(3, 48), torch.randn(2, 16, 5, 5), torch.randn(2, 16, 6, 6))
    base = ours(*inputs)
    targets = ["lin", "proj", "conv"]
    dt.inject(ours, dt.KronAConfig(factor_mode="lycoris", factor=factor, scale=1.0, target_modules=targets))
    randomize_adapter(ours, "default", seed=5)
    theirs = inject_adapter_in_model(
        LoKrConfig(r=64, alpha=64, decompose_factor=factor, target_modules=targets), theirs)
    state = {}
    for mod in targets:
        adapter = getattr(ours, mod).adapters["default"]
        state[f"{mod}.lokr_w1"] = adapter.krona_A.detach().clone()
        state[f"{mod}.lokr_w2"] = adapter.krona_B.detach().clone()
    result = set_peft_model_state_dict(theirs, state)
    assert not [k for k in result.unexpected_keys if "lokr" in k]
    for got, want, b in zip(ours(*inputs), theirs(*inputs), base):
        assert (want - b).abs().max() > 1e-2
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for mod in targets:
        torch.testing.assert_close(getattr(ours, mod).adapters["default"].delta_weight(getattr(ours, mod).weight),
                                   getattr(theirs, mod).get_delta_weight("default"), atol=1e-6, rtol=0)


def test_default_learning_rate_is_the_papers():
    assert plugin_for(dt.KronAConfig(), "k").default_lr() == 1e-3


def test_krona_config_trains_dreambooth_with_prior_preservation(tmp_path):
    """configs/krona/sd15.yaml (DreamBooth + prior preservation) runs through the trainer on the tiny SD pipeline."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from difftune.config import load_config
    from difftune.serialization import read_tensors
    from difftune.testing import save_tiny_pipeline
    from difftune.train import TrainConfig, main

    rng = np.random.default_rng(0)
    for folder in ("instance", "class"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    model = save_tiny_pipeline("sd", tmp_path / "sd")
    config = Path(__file__).resolve().parents[2] / "configs" / "krona" / "sd15.yaml"
    cfg = load_config(TrainConfig, config, [
        f"model.path={model}", f"data.path={tmp_path / 'instance'}", f"data.class_path={tmp_path / 'class'}",
        f"output_dir={tmp_path / 'out'}", "method.a1=4", "method.a2=4", "data.resolution=32", "train.max_steps=2",
        "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.gradient_checkpointing=false",
        "validation.prompts=[]", "checkpointing.checkpointing_steps=0", "logging.report_to=none",
    ])
    assert cfg.data.kind == "dreambooth" and cfg.data.class_prompt and cfg.data.prior_loss_weight > 0
    adapter = main(cfg)
    tensors = read_tensors(adapter)
    assert any(k.endswith("krona_B") and v.abs().max() > 0 for k, v in tensors.items())
