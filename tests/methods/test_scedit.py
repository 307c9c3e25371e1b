"""SCEdit: SC-Tuner (`scedit`) and CSC-Tuner (`csc`) on the UNet's skip connections (the contract covers saving,
weights, disable, removal and the training route; these tests cover what is particular to skip tuners)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import difftune as dt
from difftune.architectures import build_architecture
from difftune.methods.scedit import encoder_skips
from difftune.methods.verbs import model_parts
from difftune.testing import randomize_adapter, tiny_unet

SD_SKIPS = [1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 320]  # decoder order, methods.md §0.1
SDXL_SKIPS = [1280, 1280, 640, 640, 640, 320, 320, 320, 320]


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 500] * (batch // 2))),
            {"encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)})


def _control(seed: int = 0, n: int = 1, size: int = 128) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("arch", "method", "fields", "modules", "count"), [
    ("sd15", "scedit", {}, 12, 19_680_000),  # Σ 2C² + 2C over the 12 skips (SWIFT docs: 19.68M)
    ("sd21", "scedit", {}, 12, 19_680_000),
    ("sd15", "csc", {}, 12, 99_111_760),  # scepter issue #47: "Load trainable params 99111760"
    ("sd21", "csc", {}, 12, 99_111_760),
    ("sd15", "csc", {"hint_kernel": 1}, 12, 28_824_400),  # 7.98 % of ControlNet-SD1.5's 361,279,120
    ("sdxl", "scedit", {}, 9, 9_841_920),
])
def test_parameter_counts_on_real_architectures(arch, method, fields, modules, count):
    unet = build_architecture(arch)
    names = dt.inject(unet, dt.METHODS[method](**fields), name="a")
    assert len(names) == modules
    assert dt.trainable_parameter_count(unet, "a") == count


def test_skip_widths_match_the_published_layouts():
    assert [w for w, _ in encoder_skips(build_architecture("sd15").config)][::-1] == SD_SKIPS
    assert [w for w, _ in encoder_skips(build_architecture("sdxl").config)][::-1] == SDXL_SKIPS
    unet = build_architecture("sdxl")
    dt.inject(unet, dt.SCEditConfig(), name="a")
    widths = [unet.up_blocks[b].resnets[r].adapters["a"].width for b in range(3) for r in range(3)]
    assert widths == SDXL_SKIPS


def test_fresh_tuners_are_the_identity_and_the_formulas_hold():
    unet = tiny_unet()
    args, kw = _inputs()
    base = unet(*args, **kw).sample
    dt.inject(unet, dt.SCEditConfig(), name="sc")
    assert torch.equal(unet(*args, **kw).sample, base)  # W_up = 0, b_up = 0
    randomize_adapter(unet, "sc", seed=1)
    host = unet.up_blocks[1].resnets[0]
    ad = host.adapters["sc"]
    x = torch.randn(2, host.base_layer.in_channels, 16, 16)
    h, s = x[:, : -ad.width], x[:, -ad.width:]
    inner = F.gelu(F.conv2d(s, ad.scedit_down.weight, ad.scedit_down.bias))
    t = F.conv2d(inner, ad.scedit_up.weight, ad.scedit_up.bias)
    torch.testing.assert_close(ad.pre_forward(x, 0.7), torch.cat([h, s + 0.7 * t], 1))

    unet = tiny_unet()
    dt.inject(unet, dt.CSCConfig(), name="edge")
    with dt.adapter_inputs(control=_control()):
        assert torch.equal(unet(*args, **kw).sample, base)  # zero dense hints and zero W_up
    randomize_adapter(unet, "edge", seed=2)
    part = model_parts(unet)["edge"]
    ad = unet.up_blocks[1].resnets[0].adapters["edge"]
    with dt.adapter_inputs(control=_control(), sample=torch.zeros(2, 4, 16, 16)):
        part.begin_call({})
        got = ad.pre_forward(x, 0.5)
        c = part.hint(ad.index, {"sample": torch.zeros(2, 4, 16, 16)}, s)
    t = ad.csc_up(F.gelu(ad.csc_down(s + c)))
    torch.testing.assert_close(got, torch.cat([h, s + 0.5 * (c + t)], 1))
    assert c.shape == s.shape and c.abs().max() > 0


def _encoder_backward_calls(unet, method_config, control=None) -> list[str]:
    """Names of encoder modules (conv_in, down blocks, mid block) whose outputs took part in backward."""
    calls: list[str] = []
    encoder = {"conv_in": unet.conv_in, "mid_block": unet.mid_block,
               **{f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}}
    handles = []
    for name, module in encoder.items():
        handles.append(module.register_full_backward_hook(lambda m, gi, go, n=name: calls.append(n)))

        def tensor_hook(m, inp, out, n=name):  # any output that needs a gradient records it when one arrives
            outs = out if isinstance(out, tuple) else (out,)
            for o in outs:
                for t in (o if isinstance(o, tuple) else (o,)):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda g, n=n: calls.append(n + ":grad"))
        handles.append(module.register_forward_hook(tensor_hook))
    dt.inject(unet, method_config, name="a")
    randomize_adapter(unet, "a", seed=0)
    args, kw = _inputs()
    with dt.adapter_inputs(control=control):
        unet(*args, **kw).sample.square().mean().backward()
    for h in handles:
        h.remove()
    assert any(p.grad is not None for p in unet.parameters() if p.requires_grad)
    return calls


def test_backward_never_enters_the_encoder():
    assert _encoder_backward_calls(tiny_unet(), dt.SCEditConfig()) == []
    assert _encoder_backward_calls(tiny_unet(), dt.CSCConfig(), control=_control()) == []
    # the hooks do see backward when the encoder is adapted (LoRA on every attention, down blocks included)
    lora = _encoder_backward_calls(tiny_unet(), dt.LoRAConfig(rank=2))
    assert any(n.startswith("down_blocks") for n in lora)


def test_a_csc_adapter_without_its_control_image_is_an_error():
    unet = tiny_unet()
    args, kw = _inputs()
    dt.inject(unet, dt.CSCConfig(), name="edge")
    with pytest.raises(dt.DifftuneError, match="'edge' ran without a control image"):
        unet(*args, **kw)
    with dt.adapter_inputs(control={"other": _control()}), pytest.raises(dt.DifftuneError, match="'edge'"):
        unet(*args, **kw)
    with dt.adapter_inputs(control="edges.png"), pytest.raises(dt.DifftuneError, match="control"):
        unet(*args, **kw)
    with dt.adapter_inputs(control=_control(n=3)), pytest.raises(dt.DifftuneError, match="divisor of the batch"):
        unet(*args, **kw)
    dt.disable_adapters(unet, "edge")  # a disabled adapter needs no image
    unet(*args, **kw)


def test_two_conditions_each_read_their_own_image_and_weight():
    args, kw = _inputs()
    unet = tiny_unet()
    for i, name in enumerate(("edge", "outline")):
        dt.inject(unet, dt.CSCConfig(), name=name)
        randomize_adapter(unet, name, seed=i)
    dt.inject(unet, dt.SCEditConfig(), name="style")
    randomize_adapter(unet, "style", seed=9)
    a, b = _control(1), _control(2)
    with dt.adapter_inputs(control={"edge": a, "outline": b}):
        both = unet(*args, **kw).sample
    with dt.adapter_inputs(control={"edge": a, "outline": a}):
        same = unet(*args, **kw).sample
    assert (both - same).abs().max() > 1e-4  # 'outline' reads its own image
    dt.set_adapter_weights(unet, {"outline": 0.0})
    with dt.adapter_inputs(control={"edge": a, "outline": b}):
        w0 = unet(*args, **kw).sample
    dt.delete_adapter(unet, "outline")
    with dt.adapter_inputs(control={"edge": a}):
        assert torch.equal(unet(*args, **kw).sample, w0)


def test_the_hint_is_encoded_once_per_call_and_a_prompt_batch_is_repeated_over_guidance():
    unet = tiny_unet()
    dt.inject(unet, dt.CSCConfig(), name="edge")
    randomize_adapter(unet, "edge", seed=0)
    part = model_parts(unet)["edge"]
    calls = []
    part.csc_pre_hint.register_forward_hook(lambda *a: calls.append(1))
    args, kw = _inputs(batch=4)
    ctl = _control(n=2)
    with dt.adapter_inputs(control=ctl):
        out = unet(*args, **kw).sample
    assert calls == [1]
    with dt.adapter_inputs(control=torch.cat([ctl, ctl])):
        assert torch.equal(unet(*args, **kw).sample, out)


def test_merge_refuses_scedit_while_other_adapters_fuse():
    unet = tiny_unet()
    args, kw = _inputs()
    dt.inject(unet, dt.SCEditConfig(), name="sc")
    dt.inject(unet, dt.LoRAConfig(rank=2), name="lora")
    randomize_adapter(unet, "sc", seed=1)
    randomize_adapter(unet, "lora", seed=2)
    before = unet(*args, **kw).sample
    with pytest.raises(dt.DifftuneError, match="cannot be merged"):
        dt.fuse(unet, "sc")
    dt.fuse(unet)  # fuses LoRA, leaves the SC-Tuner running
    info = dt.list_adapters(unet)
    assert info["lora"]["fused"] and not info["sc"]["fused"]
    torch.testing.assert_close(unet(*args, **kw).sample, before, atol=1e-5, rtol=0)


def test_skips_select_decoder_positions_and_bad_fields_teach():
    unet = build_architecture("sd15")
    names = dt.inject(unet, dt.SCEditConfig(skips=[0, 11]), name="a")
    assert names == ["up_blocks.0.resnets.0", "up_blocks.3.resnets.2"]
    assert dt.trainable_parameter_count(unet, "a") == 2 * (1280**2 + 1280) + 2 * (320**2 + 320)
    assert dt.SCEditConfig.from_dict(dt.SCEditConfig(skips=[3]).to_dict()).target_modules == [
        r"up_blocks\.1\.resnets\.0"]
    with pytest.raises(dt.DifftuneError, match="skips"):
        dt.inject(tiny_unet(), dt.SCEditConfig(skips=[0]), name="a")  # 2 resnets per up block: refused
    for bad in ({"skips": [1, 1]}, {"skips": []}, {"skips": [-1]}, {"down_ratio": 0.0}, {"down_ratio": "1"}):
        with pytest.raises(dt.DifftuneError):
            dt.SCEditConfig(**bad)
    with pytest.raises(dt.DifftuneError, match="hint_kernel"):
        dt.CSCConfig(hint_kernel=2)
    with pytest.raises(dt.DifftuneError, match="UNet"):
        dt.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), dt.CSCConfig(target_modules=["0"]), name="a")
    half = build_architecture("sd15")
    dt.inject(half, dt.SCEditConfig(down_ratio=0.5), name="a")
    assert dt.trainable_parameter_count(half, "a") == sum(2 * c * (c // 2) + c // 2 + c for c in SD_SKIPS)


def test_control_data_pairs_each_image_with_its_condition(tmp_path):
    from PIL import Image

    from difftune.methods.scedit.conditions import outline
    from difftune.train.config import DataConfig
    from difftune.train.control import ControlFolder

    images, conds = tmp_path / "images", tmp_path / "conds"
    images.mkdir()
    conds.mkdir()
    for i in range(3):
        a = np.zeros((32, 40), np.uint8)  # no resize, a random crop across the width
        a[5 + i:25 + i, 8:30 - 3 * i] = 255  # asymmetric shapes: a flip or another crop changes the outline
        Image.fromarray(a).convert("RGB").save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"shape {i}")
        outline(a).save(conds / f"{i}.png")
    paired = ControlFolder(images, 32, condition_path=conds, center_crop=False, random_flip=True, seed=3)
    on_the_fly = ControlFolder(images, 32, condition="outline", center_crop=False, random_flip=True, seed=3)
    for i in range(3):
        a, b = paired[i], on_the_fly[i]
        assert a["control"].shape == (3, 32, 32) and a["caption"] == f"shape {i}"
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        # the paired outline got the image's crop and flip: it lies on the augmented shape's boundary
        shape = (a["pixel_values"][0] > 0).numpy()
        ring = a["control"][0].numpy() > 0.5
        assert ring.any() and (ring <= shape).all()
    with pytest.raises(dt.DifftuneError, match="exactly one"):
        ControlFolder(images, 32)
    with pytest.raises(dt.DifftuneError, match="data.condition"):
        ControlFolder(images, 32, condition="hed")
    (conds / "2.png").unlink()
    with pytest.raises(dt.DifftuneError, match="no condition image"):
        ControlFolder(images, 32, condition_path=conds)
    with pytest.raises(dt.DifftuneError, match="data.condition"):
        DataConfig(kind="control", path=str(images))
    with pytest.raises(dt.DifftuneError, match="unset unless"):
        DataConfig(path=str(images), condition="canny")
