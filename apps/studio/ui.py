"""The Gradio layer of the studio: components and thin callbacks into `engine.Studio` (all logic lives there).

API endpoints (``gradio_client``): ``/generate``, ``/compare``, ``/list_adapters``, ``/save_mix``, ``/load_mix``,
``/read_parameters``, ``/cancel``. The mix travels as JSON text: ``[{"key": "labs/style", "weight": 0.8}, ...]``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr

from difftune.errors import DifftuneError

from . import library
from .engine import EXTRACTORS, Cancelled, Request, Studio
from .infotext import parse_infotext, read_png_parameters
from .paths import public_message

MAX_ROWS = 24  #: adapter rows shown (the folder's first MAX_ROWS entries that are adapters)


def _errors(fn: Any, root: Path) -> Any:
    """Turn the library's DifftuneError (and an OSError) into gr.Error (a message in the UI and the API), never a
    crash; the message names files relative to the adapters folder ``root``, never a server path."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DifftuneError, OSError) as e:
            raise gr.Error(public_message(str(e), root)) from None
    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def build_demo(studio: Studio) -> gr.Blocks:
    slot = studio.main
    default_size, size_step, fixed = slot.size_rule()
    classes = slot.class_choices()
    lim = studio.limits
    rows: list[tuple[Any, Any, Any]] = []
    row_keys: list[str] = []
    errors = functools.partial(_errors, root=studio.root)

    def adapter_entries() -> list[library.Entry]:
        return [e for e in studio.entries() if e.kind == "adapter"][:MAX_ROWS]

    with gr.Blocks(title="difftune studio") as demo:
        gr.Markdown(f"## difftune studio — {slot.label}" + (
            f" (A/B model: {studio.compare_slot.label})" if studio.compare_slot else "") +
            f"\nAdapters folder: `{studio.root.name}`")  # its name: the page must not show server paths
        mix_box = gr.Textbox(visible=False, label="mix (JSON)")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value="" if slot.kind == "dit" else "a handwritten digit seven",
                                    visible=slot.kind != "dit", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", visible=slot.kind != "dit")
                class_label = gr.Dropdown(choices=classes, value=classes[0][1] if slot.kind == "dit" else None,
                                          label="Class (DiT; PixArt: for KIND adapters)", visible=bool(classes))
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, lim.max_guidance, value=4.0, step=0.5, label="Guidance (CFG)")
                with gr.Row():
                    width = gr.Slider(size_step, lim.max_size, value=default_size, step=size_step, label="Width",
                                      interactive=not fixed)
                    height = gr.Slider(size_step, lim.max_size, value=default_size, step=size_step, label="Height",
                                       interactive=not fixed)
                with gr.Row():
                    sampler = gr.Dropdown(list(slot.samplers), value=next(iter(slot.samplers)), label="Sampler")
                    batch = gr.Slider(1, lim.max_batch, value=1, step=1, label="Batch")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1: random)")
                    randomize = gr.Checkbox(value=False, label="Randomise seed")
                    used_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="used-seed")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", elem_id="cancel")
                gallery = gr.Gallery(label="Images", columns=4, height=320, elem_id="gallery", format="png")
                info = gr.Textbox(label="Parameters (infotext) and notes", lines=4, elem_id="infotext")
            with gr.Column(scale=2):
                with gr.Tab("Adapters"):
                    fused = gr.Checkbox(value=False, label="Fused (bake weight-space adapters into the weights)")
                    refresh = gr.Button("Refresh folder", size="sm")
                    library_json = gr.JSON(label="library", visible=False)
                    entries = adapter_entries()
                    for i in range(MAX_ROWS):
                        e = entries[i] if i < len(entries) else None
                        with gr.Group(visible=e is not None) as group:
                            enable = gr.Checkbox(value=False, label=e.key if e else "", elem_id=f"adapter-enable-{i}",
                                                 info=e.badges() if e else "", interactive=not (e and e.error))
                            weight = gr.Slider(-library.MAX_WEIGHT, library.MAX_WEIGHT, value=1.0, step=0.05,
                                               label="weight", elem_id=f"adapter-weight-{i}")
                        rows.append((group, enable, weight))
                        row_keys.append(e.key if e else "")
                    keys_state = gr.State(row_keys)
                    with gr.Row():
                        mix_name = gr.Textbox(label="Mix name", value="my-mix")
                        save_as = gr.Radio(["auto", "merged", "bundle"], value="auto", label="Save as")
                    save_btn = gr.Button("Save this mix")
                    bundles = [e.key for e in studio.entries() if e.kind == "bundle"]
                    bundle_pick = gr.Dropdown(bundles, label="Load a saved mix", allow_custom_value=True)
                    load_btn = gr.Button("Load mix")
                    mix_msg = gr.Markdown()
                with gr.Tab("SPM"):
                    transport = gr.Checkbox(value=True, label="Facilitated transport (γ per prompt; off: γ = 1)")
                    gr.Markdown("The γ each prompt got is reported under the images.")
                with gr.Tab("SCEdit"):
                    control = gr.Image(type="pil", label="Control image (CSC adapters)")
                    extractor = gr.Dropdown(list(EXTRACTORS), value="none", label="Extractor")
                    control_scale = gr.Slider(-2, 2, value=1.0, step=0.05,
                                              label="Control scale (the CSC adapters' weight)")
                    condition = gr.Image(label="Condition used", interactive=False)
                with gr.Tab("A/B"):
                    modes = ["adapters"] + (["model"] if studio.compare_slot else [])
                    ab_mode = gr.Radio(modes, value="adapters", label="Compare",
                                       info="adapters: without vs with the mix; model: --model vs --compare")
                    ab_btn = gr.Button("Compare (same seed)", elem_id="compare")
                    with gr.Row():
                        img_a = gr.Image(label="A", interactive=False, format="png")
                        img_b = gr.Image(label="B", interactive=False, format="png")
                    ab_info = gr.Textbox(label="A/B", lines=2)
                with gr.Tab("Read parameters"):
                    png = gr.File(label="An image with infotext", file_types=["image"])
                    read_btn = gr.Button("Read")
                    read_text = gr.Textbox(label="parameters", lines=4)
                    read_json = gr.JSON(label="parsed")
                    send_btn = gr.Button("Send to Generate")

        gen_inputs = [prompt, negative, steps, guidance, width, height, sampler, batch, seed, randomize, mix_box,
                      fused, transport, control, extractor, control_scale, class_label]

        def request(p, neg, st, g, w, h, samp, b, s, rnd, mix, fu, tr, ctrl, ex, cs, cl) -> Request:
            return Request(prompt=p or "", negative=neg or "", steps=st, guidance=g, width=w, height=h,
                           sampler=samp or "", batch=b, seed=s if s is not None else 0, randomize=bool(rnd),
                           mix=library.parse_mix(mix), fused=bool(fu), transport=bool(tr), control=ctrl,
                           extractor=ex or "none", control_scale=cs if ctrl is not None else None,
                           class_label=cl)

        def collect(keys: list[str], *values: Any) -> str:
            enables, weights = values[:MAX_ROWS], values[MAX_ROWS:]
            return json.dumps([{"key": k, "weight": float(w)} for k, on, w in zip(keys, enables, weights) if k and on])

        row_inputs = [keys_state] + [r[1] for r in rows] + [r[2] for r in rows]

        @errors
        def generate(*args: Any, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's idiom)
            """Generate images with the mix; returns (gallery, seed used, infotext + notes, condition image)."""
            try:
                r = studio.generate(request(*args), progress=lambda i, n: progress((i, n), desc="denoising"))
            except Cancelled as e:
                gr.Warning(str(e))
                return gr.skip(), gr.skip(), str(e), gr.skip()
            text = "\n\n".join([r.infotexts[0], *r.notes]) if r.infotexts else "\n".join(r.notes)
            return [str(p) for p in r.images], r.seed, text, r.condition

        @errors
        def compare(*args: Any) -> tuple:
            """A/B at one seed; returns (image A, image B, description)."""
            *gen_args, mode = args
            a, b = studio.compare(request(*gen_args), mode)
            what = ("A: no adapters, B: the mix" if mode == "adapters" else
                    f"A: {slot.label}, B: {studio.compare_slot.label if studio.compare_slot else ''}")
            return str(a.images[0]), str(b.images[0]), f"{what} · seed {a.seed}\n" + "\n".join(a.notes + b.notes)

        def list_adapters() -> list[dict[str, Any]]:
            """Every adapter and bundle of the folder with its badges."""
            return [e.to_dict() for e in studio.entries()]

        def show_rows(listing: list[dict[str, Any]]) -> list[Any]:
            adapters = [e for e in listing if e["kind"] == "adapter"][:MAX_ROWS]
            keys = [e["key"] for e in adapters] + [""] * (MAX_ROWS - len(adapters))
            groups = [gr.update(visible=bool(k)) for k in keys]
            enables = [gr.update(label=e["key"], info=e["badges"], interactive=not e["error"]) for e in adapters]
            enables += [gr.update(label="", value=False)] * (MAX_ROWS - len(adapters))
            bundle_keys = [e["key"] for e in listing if e["kind"] == "bundle"]
            return [keys, *groups, *enables, gr.update(choices=bundle_keys)]

        @errors
        def save_mix(name: str, mix: str, fu: bool, how: str) -> tuple[str, list[dict[str, Any]]]:
            """Save the mix (merged LoRA or bundle); returns (message, the folder's new listing)."""
            _, msg = studio.save_mix(name, library.parse_mix(mix), bool(fu), how)
            return msg, list_adapters()

        @errors
        def load_mix(key: str) -> tuple[str, bool, str]:
            """A saved mix (bundle key) or one adapter; returns (mix JSON, fused, notes)."""
            got = studio.load_mix(key)
            mix = json.dumps([{"key": i.key, "weight": i.weight} for i in got["items"]])
            return mix, got["fused"], "\n".join(got["notes"]) or f"loaded {key}"

        def mix_to_rows(mix: str, keys: list[str]) -> list[Any]:
            weights = {i.key: i.weight for i in library.parse_mix(mix)}
            return ([gr.update(value=k in weights) for k in keys] +
                    [gr.update(value=weights[k]) if k in weights else gr.update() for k in keys])

        @errors
        def read_parameters(file: Any) -> tuple[str, dict[str, Any]]:
            """The infotext of an uploaded image and its parsed fields."""
            if file is None:
                return "", {}
            text = read_png_parameters(file if isinstance(file, str) else file.name)
            return text, parse_infotext(text) if text else {"note": "this image carries no 'parameters' chunk"}

        def send_to_generate(parsed: dict[str, Any]) -> list[Any]:
            p = parsed.get("params", {}) if isinstance(parsed, dict) else {}
            size = p.get("Size", "x").split("x")
            num = (lambda v: float(v) if v.replace(".", "", 1).lstrip("-").isdigit() else None)  # noqa: E731
            return [parsed.get("prompt", gr.skip()), parsed.get("negative_prompt", gr.skip()),
                    num(p.get("Steps", "")) or gr.skip(), num(p.get("CFG scale", "")) or gr.skip(),
                    num(size[0]) or gr.skip(), num(size[-1]) or gr.skip(),
                    p["Sampler"] if p.get("Sampler") in slot.samplers else gr.skip(),
                    num(p.get("Seed", "")) if num(p.get("Seed", "")) is not None else gr.skip(), False]

        gen_event = gen_btn.click(collect, row_inputs, mix_box, api_visibility="private", queue=False).then(
            generate, gen_inputs, [gallery, used_seed, info, condition], api_name="generate",
            concurrency_id="model", concurrency_limit=1)
        ab_event = ab_btn.click(collect, row_inputs, mix_box, api_visibility="private", queue=False).then(
            compare, [*gen_inputs, ab_mode], [img_a, img_b, ab_info], api_name="compare",
            concurrency_id="model", concurrency_limit=1)
        cancel_btn.click(studio.cancel, None, None, api_name="cancel", queue=False, cancels=[gen_event, ab_event])
        refresh.click(list_adapters, None, library_json, api_name="list_adapters").then(
            show_rows, library_json, [keys_state, *[r[0] for r in rows], *[r[1] for r in rows], bundle_pick],
            api_visibility="private")
        save_btn.click(collect, row_inputs, mix_box, api_visibility="private", queue=False).then(
            save_mix, [mix_name, mix_box, fused, save_as], [mix_msg, library_json], api_name="save_mix",
            concurrency_id="model", concurrency_limit=1).then(
            show_rows, library_json, [keys_state, *[r[0] for r in rows], *[r[1] for r in rows], bundle_pick],
            api_visibility="private")
        load_btn.click(load_mix, bundle_pick, [mix_box, fused, mix_msg], api_name="load_mix").then(
            mix_to_rows, [mix_box, keys_state], [r[1] for r in rows] + [r[2] for r in rows],
            api_visibility="private")
        read_btn.click(read_parameters, png, [read_text, read_json], api_name="read_parameters")
        send_btn.click(send_to_generate, read_json,
                       [prompt, negative, steps, guidance, width, height, sampler, seed, randomize],
                       api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the studio (127.0.0.1 unless told otherwise); returns the Blocks (already running when block=False)."""
    demo = build_demo(studio)
    studio.out.mkdir(parents=True, exist_ok=True)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                allowed_paths=[str(studio.out)], show_error=True)
    return demo


