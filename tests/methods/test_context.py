"""Per-call adapter inputs, adapters that know their position, and model-level parts, each used by a small real
method defined here: a class gate (DiT), a prompt membrane (SD), per-item weights, a skip tuner on the UNet's
up-block resnets, and a control hint encoded once per call by a model-level part."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

import difftune as dt
from difftune.methods import base, context
from difftune.methods.base import Adapter, MethodConfig, Site
from difftune.methods.verbs import MODEL_KEY, adapter_parameters, adapter_state_dict, model_parts
from difftune.testing import randomize_adapter, tiny_dit, tiny_dit_pipeline, tiny_sd_pipeline, tiny_unet

# -- toy methods ---------------------------------------------------------------------------------------------------


class GateTable(nn.Module):
    """Model-level part of the class gate: one row per class plus the null class (DiT's id = num_classes)."""

    prefix = "gate_"

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.gate_table = nn.Parameter(torch.zeros(num_classes + 1, dim))


@dataclass
class ClassGateConfig(MethodConfig):
    target_modules: list[str] = field(default_factory=lambda: ["ff.net.2"])

    def make_model_part(self, model: nn.Module) -> nn.Module:
        c = model.config
        return GateTable(c.num_embeds_ada_norm, c.num_attention_heads * c.attention_head_dim)

    def probe_inputs(self, name: str) -> tuple[int, dict]:
        return 2, {"class_labels": torch.tensor([4, 9])}  # what its layers read: the loader probes them with it

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        return ClassGateAdapter(self) if isinstance(base_layer, nn.Linear) else None


class ClassGateAdapter(Adapter):
    """out + w · table[label_i] for each batch item i: the output depends on each item's class."""

    prefix = "gate_"
    seen: list[list[int]] = []

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        labels = self.inputs()["class_labels"]
        ClassGateAdapter.seen.append(labels.tolist())
        return out + weight * self.model_part.gate_table[labels][:, None, :].to(out.dtype)  # (B, 1, C)


@dataclass
class MembraneConfig(MethodConfig):
    """Adds w · γ_i · (a learned vector) where γ_i = 1 if the item's prompt mentions ``concept``."""

    target_modules: list[str] = field(default_factory=lambda: ["attn2.to_out.0"])
    concept: str = "cat"

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        return MembraneAdapter(self, base_layer.out_features)


class MembraneAdapter(Adapter):
    prefix = "mem_"
    seen: list[list[str]] = []

    def __init__(self, config: MembraneConfig, dim: int) -> None:
        super().__init__(config)
        self.mem_vector = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        prompts = list(self.inputs()["prompt"])
        MembraneAdapter.seen.append(prompts)
        gamma = torch.tensor([float(self.config.concept in p) for p in prompts], dtype=out.dtype)
        return out + weight * gamma.view(-1, 1, 1) * self.mem_vector


def skip_width(unet: nn.Module, up_block: int, resnet: int) -> int:
    """Channels of the encoder skip that up_blocks[up_block].resnets[resnet] concatenates (diffusers' layout)."""
    c = unet.config
    widths = list(c.block_out_channels)
    skips = [widths[0]]  # conv_in
    for i, w in enumerate(widths):
        skips += [w] * c.layers_per_block + ([w] if i < len(widths) - 1 else [])  # resnets, then the downsampler
    per_block = c.layers_per_block + 1
    return skips[::-1][up_block * per_block + resnet]


@dataclass
class SkipConfig(MethodConfig):
    target_modules: list[str] = field(default_factory=lambda: [r"up_blocks\.\d+\.resnets\.\d+"])

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        width = skip_width(site.model, site.index("up_blocks"), site.index("resnets"))
        return SkipAdapter(self, width)


class SkipAdapter(Adapter):
    """x = cat(h, s) → cat(h, s + w·T(s)): rewrites only the skip channels of its resnet's input."""

    prefix = "skip_"

    def __init__(self, config: SkipConfig, width: int) -> None:
        super().__init__(config)
        self.width = width
        self.skip_proj = nn.Conv2d(width, width, 1)

    def pre_forward(self, x: Tensor, weight: float | Tensor) -> Tensor:
        h, s = x[:, : -self.width], x[:, -self.width:]  # (B, C_h, H, W), (B, C_skip, H, W)
        return torch.cat([h, s + weight * self.skip_proj(s)], dim=1)


class HintPart(nn.Module):
    """Encodes the control input once per denoiser call (begin_call); every adapted layer reads the result."""

    prefix = "hint_"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hint_proj = nn.Linear(3, dim)
        self.calls = 0

    def begin_call(self, inputs) -> None:
        self.calls += 1
        self.current = self.hint_proj(inputs["control"])  # (B, 3) -> (B, C)


@dataclass
class HintConfig(MethodConfig):
    target_modules: list[str] = field(default_factory=lambda: ["attn2.to_out.0"])

    def make_model_part(self, model: nn.Module) -> nn.Module:
        return HintPart(model.config.block_out_channels[-1])

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        if base_layer.out_features != site.part.hint_proj.out_features:
            return None
        return HintAdapter(self)


class HintAdapter(Adapter):
    prefix = "hint_"

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        return out + weight * self.model_part.current[:, None, :]


TOYS = {"toy_gate": ClassGateConfig, "toy_membrane": MembraneConfig, "toy_skip": SkipConfig, "toy_hint": HintConfig}


@pytest.fixture(autouse=True)
def toys():
    for name, cls in TOYS.items():
        base.register_method(name)(cls)
    ClassGateAdapter.seen.clear()
    MembraneAdapter.seen.clear()
    yield
    for name in TOYS:
        del base.METHODS[name]


def _difftune(pipe, kind):
    from difftune.pipelines.difftune_dit import DifftuneDiTPipeline
    from difftune.pipelines.difftune_stable_diffusion import DifftuneStableDiffusionPipeline

    cls = {"dit": DifftuneDiTPipeline, "sd": DifftuneStableDiffusionPipeline}[kind]
    out = cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out


def _dit_images(pipe, labels, **kw):
    return pipe(class_labels=labels, num_inference_steps=2, guidance_scale=4.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def _sd_images(pipe, prompts, **kw):
    return pipe(prompts, num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


# -- per-call inputs ---------------------------------------------------------------------------------------------


def test_class_gate_sees_each_items_label_through_dit_guidance():
    pipe = _difftune(tiny_dit_pipeline(), "dit")
    base_images = _dit_images(pipe, [1, 3])
    dt.inject(pipe, ClassGateConfig(), name="gate")
    table = model_parts(pipe.transformer)["gate"].gate_table
    with torch.no_grad():
        table[3] = 0.5  # only class 3 is gated
    images = _dit_images(pipe, [1, 3])
    # the guidance batch is [cond..., null...]; the null class (1000) is a row of its own
    assert ClassGateAdapter.seen[0] == [1, 3, 1000, 1000]
    assert (images[0] == base_images[0]).all()
    assert abs(images[1] - base_images[1]).max() > 1e-3
    with torch.no_grad():
        table.zero_()
        table[1000] = 0.5  # only the null class: every item's unconditional half changes
    images = _dit_images(pipe, [1, 3])
    assert all(abs(images[i] - base_images[i]).max() > 1e-3 for i in range(2))


def test_prompt_membrane_reads_each_prompt_through_the_sd_pipeline():
    pipe = _difftune(tiny_sd_pipeline(), "sd")
    prompts = ["a photo of a cat", "a red car"]
    base_images = _sd_images(pipe, prompts, num_images_per_prompt=2)
    dt.inject(pipe, MembraneConfig(), name="m")
    randomize_adapter(pipe.unet, "m", seed=0, std=1.0)
    images = _sd_images(pipe, prompts, num_images_per_prompt=2)
    # unconditional half first (the negative prompt, ""), then each prompt repeated per image
    assert MembraneAdapter.seen[0] == ["", "", "", "", prompts[0], prompts[0], prompts[1], prompts[1]]
    assert all(abs(images[i] - base_images[i]).max() > 1e-3 for i in (0, 1))
    assert (images[2:] == base_images[2:]).all()  # the car images never met the membrane


def test_per_item_adapter_weights_in_one_guided_call(tmp_path):
    pipe = _difftune(tiny_sd_pipeline(), "sd")
    prompts = ["a photo of a cat", "a photo of a dog"]
    base_images = _sd_images(pipe, prompts)
    dt.inject(pipe, dt.LoRAConfig(rank=2), name="l")
    randomize_adapter(pipe.unet, "l", seed=1, std=0.5)
    full = _sd_images(pipe, prompts)
    mixed = _sd_images(pipe, prompts, adapter_inputs={"adapter_weights": {"l": [1.0, 0.0]}})
    torch.testing.assert_close(torch.from_numpy(mixed[0]), torch.from_numpy(full[0]), atol=1e-6, rtol=0)
    assert (mixed[1] == base_images[1]).all()
    # the same through difftune.generation.generate on a stock pipeline (expanded there)
    from difftune.generation import generate

    stock = tiny_sd_pipeline()
    stock.set_progress_bar_config(disable=True)
    dt.inject(stock, dt.LoRAConfig(rank=2), name="l")
    randomize_adapter(stock.unet, "l", seed=1, std=0.5)
    img = generate(stock, prompt="a photo of a cat", steps=2, guidance=7.5, height=32, width=32, num_images=2,
                   adapter_inputs={"adapter_weights": {"l": [0.0]}})
    plain = generate(tiny_sd_pipeline(), prompt="a photo of a cat", steps=2, guidance=7.5, height=32, width=32,
                     num_images=2)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(img, plain))
    dt.fuse(pipe, "l")
    with pytest.raises(dt.DifftuneError, match="fused"):
        _sd_images(pipe, prompts, adapter_inputs={"adapter_weights": {"l": [1.0, 0.0]}})


def test_adapter_inputs_are_scoped_validated_and_sized():
    assert dict(context.current_inputs()) == {}
    with dt.adapter_inputs(control=1, adapter_weights={"a": [1.0]}):
        with dt.adapter_inputs(control=2, adapter_weights={"b": [0.5]}):
            inner = context.current_inputs()
            assert inner["control"] == 2 and inner["adapter_weights"] == {"a": [1.0], "b": [0.5]}
        assert context.current_inputs()["control"] == 1
    assert dict(context.current_inputs()) == {}
    for bad in ({"a": "1"}, {"a": []}, {"a": [float("nan")]}, ["a"], {"a": [True]}):
        with pytest.raises(dt.DifftuneError, match="adapter_weights"), dt.adapter_inputs(adapter_weights=bad):
            pass
    model = tiny_dit()
    dt.inject(model, dt.LoRAConfig(rank=2), name="l")
    x = torch.randn(2, 4, 16, 16)
    three = {"l": [1.0, 0.0, 1.0]}
    with dt.adapter_inputs(adapter_weights=three), pytest.raises(dt.DifftuneError, match="one weight"):
        model(x, timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, 1]))


def test_expand_inputs_orders_and_repeats():
    e = context.expand_inputs({"p": ["a", "b"], "t": torch.tensor([1.0, 2.0]), "s": "x", "adapter_weights":
                               {"l": [1.0, 0.5]}}, 2, per_prompt=2, guided=True, uncond_first=True,
                              negative={"p": ["", ""]})
    assert e["p"] == ["", "", "", "", "a", "a", "b", "b"] and e["s"] == "x"
    assert e["t"].tolist() == [1, 1, 2, 2, 1, 1, 2, 2] and e["adapter_weights"]["l"] == [1, 1, .5, .5, 1, 1, .5, .5]
    e = context.expand_inputs({"t": torch.tensor([1.0, 2.0])}, 2, guided=True, uncond_first=False)
    assert e["t"].tolist() == [1, 2, 1, 2]


def test_inputs_reach_checkpointed_blocks_recomputed_in_backward():
    torch.manual_seed(0)
    grads = []
    for checkpointing in (False, True):
        model = tiny_dit()
        dt.inject(model, ClassGateConfig(), name="gate")
        randomize_adapter(model, "gate", seed=2)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.eval()  # no label dropout: both runs must see the same labels (checkpointing runs in eval too)
        g = torch.Generator().manual_seed(1)
        out = model(torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([5, 50]),
                    class_labels=torch.tensor([2, 7])).sample
        out.pow(2).mean().backward()
        grads.append(model_parts(model)["gate"].gate_table.grad.clone())
    assert grads[0][[2, 7]].abs().sum() > 0 and grads[0][[0, 1, 3]].abs().sum() == 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert context._LAST[0]["class_labels"].tolist() == [2, 7]  # what the recomputation read


# -- position-aware adapters -------------------------------------------------------------------------------------


def test_skip_tuner_reads_its_position_and_only_rewrites_its_input():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]))
    kw = {"encoder_hidden_states": torch.randn(2, 7, 32, generator=g)}
    base_out = unet(*inputs, **kw).sample
    seen: dict[str, int] = {}
    for name, m in unet.named_modules():  # ground truth: the channels each up resnet receives beyond its own path
        if name.startswith("up_blocks.") and name.count(".") == 3 and "resnets" in name:
            seen[name] = m.conv1.in_channels
    names = dt.inject(unet, SkipConfig(), name="skip")
    assert sorted(names) == sorted(seen)
    for name in names:
        adapter = unet.get_submodule(name).adapters["skip"]
        assert 0 < adapter.width < seen[name]
    randomize_adapter(unet, "skip", seed=3)
    out = unet(*inputs, **kw).sample
    assert (out - base_out).abs().max() > 1e-3
    dt.set_adapter_weights(unet, {"skip": 0.0})
    assert torch.equal(unet(*inputs, **kw).sample, base_out)
    with pytest.raises(dt.DifftuneError, match="cannot be merged"):
        dt.fuse(unet, "skip")


def test_site_index_and_parent():
    unet = tiny_unet()
    site = Site("up_blocks.1.resnets.0.conv1", unet)
    assert site.index("up_blocks") == 1 and site.index("resnets") == 0 and site.index("down_blocks") is None
    assert site.parent is unet.up_blocks[1].resnets[0]


# -- model-level parts -------------------------------------------------------------------------------------------


def test_model_part_saves_loads_counts_trains_and_deletes_with_its_adapter(tmp_path):
    model = tiny_dit()
    x = (torch.randn(2, 4, 16, 16),)
    kw = {"timestep": torch.tensor([3, 30]), "class_labels": torch.tensor([4, 9])}
    base_out = model(*x, **kw).sample
    dt.inject(model, ClassGateConfig(), name="gate")
    randomize_adapter(model, "gate", seed=5)
    out = model(*x, **kw).sample
    assert (out - base_out).abs().max() > 1e-3
    state = adapter_state_dict(model, "gate")
    assert f"{MODEL_KEY}.gate_table" in state and state[f"{MODEL_KEY}.gate_table"].shape == (1001, 32)
    assert dt.trainable_parameter_count(model, "gate") == 1001 * 32  # the layers own no tensors here
    assert all(p.requires_grad for p in adapter_parameters(model, "gate"))
    dt.save_adapter(model, tmp_path / "gate", name="gate")
    fresh = tiny_dit()
    dt.load_adapter(fresh, tmp_path / "gate")
    assert torch.equal(fresh(*x, **kw).sample, out)
    refs = [weakref.ref(p) for p in adapter_parameters(fresh, "gate")]
    dt.delete_adapter(fresh, "gate")
    gc.collect()
    assert all(r() is None for r in refs) and "difftune_parts" not in dict(fresh.named_children())
    assert torch.equal(fresh(*x, **kw).sample, base_out)
    # a file whose part has the wrong shape is refused, naming the key, and leaves nothing behind
    bad = tiny_dit()
    bad.register_to_config(num_embeds_ada_norm=10)
    with pytest.raises(dt.DifftuneError, match="__model__.gate_table"):
        dt.load_adapter(bad, tmp_path / "gate")
    assert dt.list_adapters(bad) == {} and "difftune_parts" not in dict(bad.named_children())


def test_model_part_runs_once_per_call_with_a_per_prompt_control_input():
    pipe = _difftune(tiny_sd_pipeline(), "sd")
    prompts = ["a photo of a cat", "a red car"]
    dt.inject(pipe, HintConfig(), name="hint")
    randomize_adapter(pipe.unet, "hint", seed=0, std=1.0)
    part = model_parts(pipe.unet)["hint"]
    control = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    a = _sd_images(pipe, prompts, adapter_inputs={"control": control})
    assert part.calls == 2 and part.current.shape == (4, 64)  # one encoding per denoiser call, guidance batch
    b = _sd_images(pipe, prompts, adapter_inputs={"control": control * 2})
    assert abs(a[0] - b[0]).max() > 1e-4
    with pytest.raises(KeyError, match="control"):
        _sd_images(pipe, prompts)


def test_parts_must_carry_the_method_prefix():
    class Stray(nn.Module):
        prefix = "gate_"

        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(2))

    class StrayConfig(ClassGateConfig):
        def make_model_part(self, model):
            return Stray()

    base.register_method("toy_stray")(StrayConfig)
    try:
        model = tiny_dit()
        with pytest.raises(dt.DifftuneError, match="prefix"):
            dt.inject(model, StrayConfig(), name="s")
        assert dt.list_adapters(model) == {}
    finally:
        del base.METHODS["toy_stray"]
