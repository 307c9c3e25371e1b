"""The tiny SD3 and Flux pipelines: offline, seeded, the released layouts in small, and saved folders that load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from difftune.testing import save_tiny_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def _image(pipe, seed: int = 0) -> np.ndarray:
    return pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np",
                max_sequence_length=16, generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_tiny_pipeline_generates_offline_and_is_seeded(kind):
    pipe = BUILDERS[kind]()
    image = _image(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0
    np.testing.assert_array_equal(image, _image(BUILDERS[kind]()))  # same seed, same weights, same image
    assert not np.array_equal(image, _image(BUILDERS[kind](seed=1)))
    assert pipe.vae.config.latent_channels == 16 and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)


def test_layouts_follow_the_released_models():
    sd3, flux = tiny_sd3_pipeline(), tiny_flux_pipeline()
    # SD3: three encoders, pooled = both CLIP projections; CLIP states padded to the T5 width = joint attention dim
    assert sd3.text_encoder_3.config.d_model == sd3.transformer.config.joint_attention_dim
    pooled = sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    assert pooled == sd3.transformer.config.pooled_projection_dim
    # Flux: packed 2x2 patches of the 16 latent channels, guidance embedder of [dev], dynamic shifting
    assert flux.transformer.config.in_channels == 4 * flux.vae.config.latent_channels
    assert flux.transformer.config.guidance_embeds and flux.scheduler.config.use_dynamic_shifting
    assert not tiny_flux_pipeline(guidance=False).transformer.config.guidance_embeds
    assert sum(flux.transformer.config.axes_dims_rope) == flux.transformer.config.attention_head_dim


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_saved_tiny_pipeline_loads_with_the_same_image(kind, tmp_path):
    folder = save_tiny_pipeline(kind, tmp_path / kind)
    loaded = DiffusionPipeline.from_pretrained(str(folder))
    assert type(loaded) is type(BUILDERS[kind]())
    np.testing.assert_allclose(_image(loaded), _image(BUILDERS[kind]()), atol=1e-6)
