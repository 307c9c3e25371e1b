"""`difftune demo`: the tiny end-to-end example (inject → save → load into a pipeline → generate at several weights).

It runs offline in seconds on a CPU with a tiny, randomly initialized SD pipeline and an adapter filled with random
values; it shows the plumbing, not image quality. The reference-model quickstart replaces it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .counting import inspect_adapter
from .generation import generate, load_pipeline
from .loading import inject, load_adapter, save_adapter, set_adapter_weights
from .methods.lora import LoRAConfig
from .zoo.tiny import randomize_adapter, save_tiny_pipeline

WEIGHTS = (0.0, 0.5, 1.0)


def run_demo(out: Path, prompt: str = "a photo of a cat", seed: int = 0) -> dict[str, Path]:
    """Write ``model/``, ``adapter/`` and ``weights.png`` (one image per adapter weight) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_pipeline("sd", out / "model", seed=seed)

    pipe = load_pipeline(model_dir)
    inject(pipe, LoRAConfig(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), name="demo")
    randomize_adapter(pipe.unet, "demo", seed=seed, std=0.3)  # stands in for a trained adapter
    adapter_dir = save_adapter(pipe, out / "adapter", name="demo", base_model=str(model_dir))

    fresh = load_pipeline(model_dir)
    load_adapter(fresh, adapter_dir)
    images = []
    for w in tqdm(WEIGHTS, desc="generating"):
        set_adapter_weights(fresh, {"demo": w})
        images.append(generate(fresh, prompt=prompt, seed=seed, steps=10)[0])
    grid = Image.new("RGB", (sum(i.width for i in images), images[0].height))
    for k, img in enumerate(images):
        grid.paste(img, (k * img.width, 0))
    grid = grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST)
    grid.save(out / "weights.png")

    info = inspect_adapter(adapter_dir)
    print(f"adapter: {adapter_dir} ({info['method']}, {info['parameters']:,} params, {info['file_bytes']:,} bytes)")
    print(f"images at weights {WEIGHTS}: {out / 'weights.png'}")
    print("load it into a diffusers pipeline:")
    print("    import difftune as dt")
    print("    from diffusers import DiffusionPipeline")
    print(f"    pipe = DiffusionPipeline.from_pretrained({str(model_dir)!r})")
    print(f"    dt.load_adapter(pipe, {str(adapter_dir)!r}, weight=0.8)")
    print(f"or: difftune generate --model {model_dir} --adapter {adapter_dir}:0.8 --prompt '{prompt}' --out img.png")
    return {"model": model_dir, "adapter": adapter_dir, "grid": out / "weights.png"}
