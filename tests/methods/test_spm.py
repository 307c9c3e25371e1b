"""SPM: the membrane's size, facilitated transport (both rules, linear and squared), exact composition, γ = 0, the
training objective through the trainer, and the kohya export/import (loaded by lycoris-lora)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import difftune as dt
from difftune.methods.spm import (
    SPMConfig,
    permeability,
    random_anchors,
    set_matching,
    set_transport,
    token_overlap,
)
from difftune.methods.verbs import hosts, model_part
from difftune.testing import randomize_adapter, tiny_sd_pipeline, tiny_unet

REPO = Path(__file__).resolve().parents[2]


def test_sd15_sd21_sdxl_sizes(capsys):
    from difftune.architectures import build_architecture
    from difftune.cli import main
    from difftune.counting import count_trainable

    info = count_trainable(SPMConfig(), build_architecture("sd15"))
    assert (info["modules"], info["parameters"]) == (192, 423_936)  # 1.696 MB in fp32: the paper's "1.7 MB"
    assert info["parameters"] * 4 / 1e6 == pytest.approx(1.696, abs=5e-4)
    assert count_trainable(SPMConfig(), build_architecture("sd21"))["parameters"] == 432_128
    assert count_trainable(SPMConfig(), build_architecture("sdxl"))["parameters"] == 2_659_840
    assert main(["inspect", "--architecture", "sd15", "--method", "spm"]) == 0
    assert "423,936" in capsys.readouterr().out


def test_targets_are_every_linear_and_conv_of_the_transformer_blocks():
    unet = tiny_unet()
    names = dt.inject(unet, SPMConfig(), name="s")
    assert len(names) == 12 * sum(1 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0"))
    leaves = {n.split("transformer_blocks.0.")[-1] for n in names if "transformer_blocks.0." in n}
    assert leaves == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    assert all("resnets" not in n for n in names)


# -- facilitated transport ------------------------------------------------------------------------------------------


def test_token_rule_on_hand_made_token_sets():
    assert token_overlap("a photo of Snoopy", "snoopy") == 1.0
    assert token_overlap("a red car", "snoopy") == 0.0
    assert token_overlap("van gogh style", "Van Gogh") == 1.0
    assert token_overlap("a gogh", "van gogh") == 0.5


def test_cosine_and_token_rules_linear_and_squared():
    c = torch.zeros(2, 3, 4)
    c[0, 0, 0] = 1.0  # concept 1 along e0; concept 2 unknown (zeros: its cosine is not used)
    e = torch.zeros(3, 3, 4)
    e[0, 0, 0] = 2.0  # item 0: parallel to concept 1 → cos 1
    e[1, 0, 0], e[1, 1, 1] = 1.0, 1.0  # item 1: cos 1/√2
    e[2, 2, 2] = -1.0  # item 2: orthogonal (cos 0)
    prompts = ["x", "y", "a cat and a dog"]
    cfg = SPMConfig(concepts=["cat", "dog bird"])
    expected_cos = torch.tensor([1.0, 2 ** -0.5, 0.0])
    torch.testing.assert_close(permeability(SPMConfig(concepts=["cat", "dog bird"], matching="clipcos"), prompts, e,
                                            c), expected_cos)
    torch.testing.assert_close(permeability(SPMConfig(concepts=["cat", "dog bird"], matching="tokenuni"), prompts, e,
                                            c), torch.tensor([0.0, 0.0, 1.0]))
    both = torch.tensor([1.0, 2 ** -0.5, 1.0])
    torch.testing.assert_close(permeability(cfg, prompts, e, c), both)
    sq = SPMConfig(concepts=["cat", "dog bird"], gamma_mode="squared")
    torch.testing.assert_close(permeability(sq, prompts, e, c), both ** 2)
    # a negative cosine is clamped to 0 (it would amplify the concept); "fixed" means γ = 1 (None)
    torch.testing.assert_close(permeability(SPMConfig(concepts=["cat"], matching="clipcos"), ["z"], -e[:1], c[:1]),
                               torch.tensor([0.0]))
    assert permeability(SPMConfig(concepts=["cat"], matching="fixed"), ["z"], e[:1], c[:1]) is None


def _two_spms(gamma_mode: str = "linear"):
    unet = tiny_unet()
    for i, concept in enumerate(("cat", "dog")):
        dt.inject(unet, SPMConfig(concepts=[concept], matching="tokenuni", gamma_mode=gamma_mode), name=concept)
        randomize_adapter(unet, concept, seed=i, std=0.3)
    return unet


@pytest.mark.parametrize("gamma_mode", ["linear", "squared"])
def test_two_spms_compose_exactly_each_with_its_own_gamma(gamma_mode):
    unet = _two_spms(gamma_mode)
    prompts = ["a cat", "a dog", "a cat and a dog", "a car"]
    gammas = {"cat": torch.tensor([1.0, 0, 1, 0]), "dog": torch.tensor([0.0, 1, 1, 0])}
    ehs = torch.randn(4, 7, 32)
    for n in gammas:
        model_part(unet, n).begin_call({"prompt": prompts, "encoder_hidden_states": ehs})
    name, host = next((n, h) for n, h in hosts(unet) if n.endswith("attn2.to_q"))
    x = torch.randn(4, 5, host.base_layer.in_features)
    expected = host.base_layer(x)
    for n, g in gammas.items():
        g = g * g if gamma_mode == "squared" else g
        expected = expected + g.view(4, 1, 1) * F.linear(x, host.adapters[n].delta_weight(host.base_layer.weight))
    torch.testing.assert_close(host(x), expected, atol=1e-6, rtol=0)
    # the official factor-wise merge ((Σγu)(Σγd)ᵀ) would add cross terms u_cat d_dogᵀ for item 2: we do not
    a, b = host.adapters["cat"], host.adapters["dog"]
    merged = F.linear(F.linear(x[2:3], a.spm_down + b.spm_down), a.spm_up + b.spm_up)
    assert (host(x)[2:3] - host.base_layer(x[2:3]) - merged).abs().max() > 1e-4


def test_gamma_zero_gives_the_base_output_bit_for_bit():
    unet = _two_spms()
    args = (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]))
    kw = {"encoder_hidden_states": torch.randn(2, 7, 32)}
    base = tiny_unet()(*args, **kw).sample  # the same seeded UNet without membranes
    with dt.adapter_inputs(prompt=["a car", "a tree"]):
        assert torch.equal(unet(*args, **kw).sample, base)
    with dt.adapter_inputs(prompt=["a car", "a cat"]):
        out = unet(*args, **kw).sample
    assert torch.equal(out[0], base[0]) and (out[1] - base[1]).abs().max() > 1e-4
    set_transport(unet, "cat", False)  # fixed strength: γ = 1 on every prompt
    with dt.adapter_inputs(prompt=["a car", "a tree"]):
        assert (unet(*args, **kw).sample[0] - base[0]).abs().max() > 1e-4
    set_transport(unet, "cat", True)
    set_matching(unet, "dog", "fixed")  # the same through the rule, kept in the adapter's config
    with dt.adapter_inputs(prompt=["a car", "a tree"]):
        assert (unet(*args, **kw).sample[0] - base[0]).abs().max() > 1e-4
    with pytest.raises(dt.DifftuneError, match="matching"):
        set_matching(unet, "dog", "clip")


def _difftune_sd():
    from difftune.pipelines.difftune_stable_diffusion import DifftuneStableDiffusionPipeline

    pipe = DifftuneStableDiffusionPipeline(**tiny_sd_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompts):
    return pipe(prompts, num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_transport_through_the_pipeline_per_prompt_with_stored_concept_embeddings():
    pipe = _difftune_sd()
    prompts = ["a photo of a cat", "a red car"]
    base = _images(pipe, prompts)
    dt.inject(pipe, SPMConfig(concepts=["cat"], matching="tokenuni"), name="cat")
    randomize_adapter(pipe.unet, "cat", seed=0, std=0.5)
    out = _images(pipe, prompts)
    assert (out[0] - base[0]).max() > 1e-3 and (out[1] == base[1]).all()  # the car never meets the membrane
    # clipcos_tokenuni with E(c) stored: γ(car) = cos(E("a red car"), E("cat")), computed as the official code does
    cfg = dt.methods.verbs.get_config(pipe.unet, "cat")
    cfg.matching = "clipcos_tokenuni"
    embeds = dt.methods.spm.encode_concepts(pipe, "cat")
    assert embeds.shape == (1, 77, 32) and embeds.abs().sum() > 0
    part = model_part(pipe.unet, "cat")
    _images(pipe, prompts)
    ids = pipe.tokenizer(prompts[1], padding="max_length", max_length=77, return_tensors="pt").input_ids
    e_car = pipe.text_encoder(ids)[0]
    expected = F.cosine_similarity(e_car.flatten(1), embeds.flatten(1)).clamp(0, 1)
    assert part.gamma.shape == (4,)  # [uncond ×2, cat, car]
    torch.testing.assert_close(part.gamma[2], torch.tensor(1.0))
    torch.testing.assert_close(part.gamma[3:], expected, atol=1e-5, rtol=0)


def test_fusing_turns_transport_off_and_says_so():
    import difftune.methods.spm.adapter as spm_adapter

    unet = _two_spms()
    spm_adapter._WARNED.clear()
    with pytest.warns(UserWarning, match="facilitated transport off"):
        dt.fuse(unet, "cat")
    dt.unfuse(unet, "cat")
    fixed = tiny_unet()
    dt.inject(fixed, SPMConfig(matching="fixed"), name="f")
    spm_adapter._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.fuse(fixed, "f")  # γ = 1 is what a fixed-strength SPM means: nothing to warn about


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"matching": "clip"}, "matching"), ({"gamma_mode": "cube"}, "gamma_mode"), ({"action": "forget"}, "action"),
    ({"concepts": ["a"], "surrogates": ["b", "c"]}, "surrogates"), ({"concepts": [""]}, "concepts"),
    ({"rank": 0}, "rank"), ({"num_anchors": 0}, "num_anchors"), ({"la_strength": "big"}, "la_strength")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(dt.DifftuneError, match=field):
        SPMConfig(**kwargs)


# -- training ---------------------------------------------------------------------------------------------------


def test_random_anchors_follow_the_official_sampler():
    torch.manual_seed(0)
    target = torch.randn(77, 32)
    anchors = random_anchors(target, 4)
    assert anchors.shape == (4, 77, 32)
    ratio = anchors.flatten(1).norm(dim=1) / target.norm()
    assert ((ratio >= 0.8 - 1e-5) & (ratio <= 1.2 + 1e-5)).all()
    assert len({round(float(r), 6) for r in ratio}) == 4  # K distinct anchors, none of them the empty prompt


@pytest.mark.parametrize("action", ["erase_with_la", "erase"])
def test_data_free_training_through_the_trainer(tmp_path, action):
    from difftune.config import load_config
    from difftune.serialization import read_header, read_tensors
    from difftune.testing import save_tiny_pipeline
    from difftune.train import TrainConfig, main

    model = save_tiny_pipeline("sd", tmp_path / "sd")
    cfg = load_config(TrainConfig, REPO / "configs" / "spm" / "sd-mini.yaml", [
        f"model.path={model}", f"output_dir={tmp_path / 'out'}", "train.max_steps=2", "method.sampling_steps=4",
        f"method.action={action}", "method.concepts=[cat, dog]", "method.surrogates=['', animal]",
        "optimizer.lr=1e-2"])
    assert cfg.data.kind == "none"
    adapter = main(cfg)
    tensors = read_tensors(adapter)
    assert any(k.endswith("spm_up") and v.abs().max() > 0 for k, v in tensors.items())  # U left zero: it trained
    assert tensors["__model__.spm_concept_embeds"].shape == (2, 77, 32)
    assert tensors["__model__.spm_concept_embeds"].abs().sum(dim=(1, 2)).min() > 0  # E(c) of both concepts
    assert read_header(adapter)["config"]["concepts"] == ["cat", "dog"]


def test_every_config_loads():
    from difftune.config import load_config
    from difftune.train import TrainConfig

    for path in sorted((REPO / "configs" / "spm").glob("*.yaml")):
        cfg = load_config(TrainConfig, path, [])
        assert cfg.method["name"] == "spm" and cfg.data.kind == "none", path
