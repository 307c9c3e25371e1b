"""The Gradio layer of the studio: components and thin callbacks into `engine.Studio` (all logic lives there).

API endpoints (``gradio_client``): ``/generate``, ``/compare``, ``/list_adapters``, ``/save_mix``, ``/load_mix``,
``/read_parameters``, ``/cancel``, ``/list_models``, ``/switch_model`` (a listed label and the mix; returns the mix
kept for the new model and notes). The mix travels as JSON text: ``[{"key": "labs/style", "weight": 0.8}, ...]``.
``/generate`` and ``/compare`` take, after the class, the mode ("txt2img", "img2img", "inpaint"), the init image, the
mask and the strength (`gradio_client` needs every argument: pass "txt2img", None, None, 0.75 for text-to-image).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr

from difftune.errors import DifftuneError

from . import compat, controls, library, modes, recall, rows
from .engine import EXTRACTORS, Cancelled, Request, Studio
from .infotext import parse_infotext, read_png_parameters
from .paths import public_message

MAX_ROWS = rows.MAX_ROWS
#: the result gallery grows with its image (Gradio's fixed height scrolled a cropped band of it) and an image never
#: grows past the window's height; object-fit "contain" shows it whole at its aspect ratio
CSS = """#gallery .grid-wrap { height: auto !important; max-height: none !important; }
#gallery .thumbnail-lg { max-height: calc(100vh - 130px); }
#ab-a img, #ab-b img { width: 100%; height: 100%; object-fit: contain; }"""
#: Ctrl+Enter (Cmd+Enter) anywhere on the page clicks Generate
KEYS_JS = """() => { document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
    const b = document.getElementById("generate"); if (b) { e.preventDefault(); b.click(); } } }); }"""


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


def _path(item: Any) -> str:
    """A gallery item as a callback gets it: (path, caption), a path, or a dict holding one."""
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("image", item)
        item = item.get("path", "") if isinstance(item, dict) else item
    return str(item)


def build_demo(studio: Studio) -> gr.Blocks:
    slot = studio.main
    default_size, size_step, fixed = slot.size_rule()
    classes = slot.class_choices()
    family = slot.defaults()  # steps and guidance where the model's pipeline starts
    lim = studio.limits
    headers, groups, enables, weights = [], [], [], []
    errors = functools.partial(_errors, root=studio.root)

    def list_adapters() -> list[dict[str, Any]]:
        """Every adapter and bundle of the folder with its badges (a warning on those made for another model, the
        reason on those that cannot run on it: `compat.unusable`)."""
        return [compat.flag(e.to_dict(), studio.main.label, studio.main.bases,
                            studio.main.unusable(studio.root, e.key) if e.kind == "adapter" and not e.error else "")
                for e in studio.entries()]

    with gr.Blocks(title="difftune studio") as demo:
        with gr.Row(equal_height=False):  # beside the title: Generate and the result stay in the window's height
            with gr.Column(scale=5, min_width=340):
                title = gr.Markdown(controls.title(studio))
            with gr.Column(scale=6, min_width=340), gr.Row(equal_height=True):
                model_pick = gr.Dropdown(list(studio.model_choices()), value=next(iter(studio.model_choices())),
                                         label="Model (shipped, models folder, Hub cache)", elem_id="model", scale=4)
                refresh_models = gr.Button("Refresh models", size="sm", scale=1, min_width=110)
                models_json = gr.JSON(visible=False)
        mix_box = gr.Textbox(visible=False, label="mix (JSON)")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340):  # the controls; the result beside them (below on a phone)
                prompt = gr.Textbox(label="Prompt", value="" if slot.kind == "dit" else "a handwritten digit seven",
                                    visible=slot.kind != "dit", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", visible=controls.has_negative(slot))
                class_label = gr.Dropdown(choices=classes, value=classes[0][1] if slot.kind == "dit" else None,
                                          label="Class (DiT; PixArt: for KIND adapters)", visible=bool(classes),
                                          elem_id="class")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=min(family["steps"], lim.max_steps), step=1,
                                      label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, lim.max_guidance, value=min(family["guidance"], lim.max_guidance),
                                         step=0.5, label=controls.guidance_label(slot))
                with gr.Row():
                    width = gr.Slider(size_step, lim.max_size, value=default_size, step=size_step, label="Width",
                                      interactive=not fixed, elem_id="width")
                    height = gr.Slider(size_step, lim.max_size, value=default_size, step=size_step, label="Height",
                                       interactive=not fixed, elem_id="height")
                with gr.Row():
                    sampler = gr.Dropdown(list(slot.samplers), value=next(iter(slot.samplers)), label="Sampler",
                                          elem_id="sampler")
                    batch = gr.Slider(1, lim.max_batch, value=1, step=1, label="Batch")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1: random)", elem_id="seed")
                    randomize = gr.Checkbox(value=False, label="Randomise seed")
                    used_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="used-seed")
                    reuse_btn = gr.Button("♻ Reuse seed", size="sm", elem_id="reuse-seed")
                with gr.Row():
                    gen_btn = gr.Button("Generate (Ctrl+Enter)", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", elem_id="cancel")
                status = gr.Markdown("ready", elem_id="status")
                with gr.Tab("Adapters"):
                    fused = gr.Checkbox(value=False, label="Fused (bake weight-space adapters into the weights)")
                    with gr.Row():
                        refresh = gr.Button("Refresh folder", size="sm", scale=0, min_width=130,
                                            elem_id="refresh")
                        query = gr.Textbox(placeholder="filter: key, method, base …", show_label=False,
                                           container=False, elem_id="adapter-filter")
                    listing = list_adapters()
                    library_json = gr.JSON(listing, label="library", visible=False)
                    slots, summary = rows.layout(listing, "", {})
                    row_summary = gr.Markdown(summary, elem_id="adapter-summary")
                    # fixed slots; which adapter each shows is `ids_state`, the ticks and weights live in
                    # `selection_state` by adapter identity (rows.py): a redraw never leaves a tick on a slot
                    for i, sl in enumerate(slots):
                        headers.append(gr.Markdown(sl.header, visible=bool(sl.header), elem_id=f"adapter-group-{i}"))
                        with gr.Group(visible=bool(sl.ident)) as group:
                            enables.append(gr.Checkbox(value=False, label=sl.label, elem_id=f"adapter-enable-{i}",
                                                       info=sl.info, interactive=sl.usable))
                            weights.append(gr.Slider(-library.MAX_WEIGHT, library.MAX_WEIGHT, value=1.0, step=0.05,
                                                     label="weight", elem_id=f"adapter-weight-{i}"))
                        groups.append(group)
                    # in the page, not a gr.State: a State lives on the server and may already hold a newer
                    # redraw's slots than the tick values an event sends; the page sends both as it shows them
                    ids_state = gr.JSON([sl.ident for sl in slots], visible=False)
                    selection_state = gr.State({})
                    with gr.Row():
                        mix_name = gr.Textbox(label="Mix name", value="my-mix")
                        save_as = gr.Radio(["auto", "merged", "bundle"], value="auto", label="Save as")
                    save_btn = gr.Button("Save this mix")
                    bundles = [e.key for e in studio.entries() if e.kind == "bundle"]
                    bundle_pick = gr.Dropdown(bundles, label="Load a saved mix", allow_custom_value=True)
                    load_btn = gr.Button("Load mix")
                    mix_msg = gr.Markdown()
                with gr.Tab("SPM"):
                    transport = gr.Checkbox(value=True, label="Facilitated transport (γ per prompt; off: γ = 1)",
                                            elem_id="transport")
                    gr.Markdown("The γ each prompt got is reported under the images.")
                with gr.Tab("SCEdit"):
                    control = gr.Image(type="pil", label="Control image (CSC adapters)", elem_id="control",
                                       format="png")
                    extractor = gr.Dropdown(list(EXTRACTORS), value="none", label="Extractor")
                    control_scale = gr.Slider(-2, 2, value=1.0, step=0.05, elem_id="control-scale",
                                              label="Control scale (multiplies the CSC adapters' weights)")
                    condition = gr.Image(label="Condition used", interactive=False)
                with gr.Tab("img2img / inpaint", visible=slot.kind in modes.PIPELINES) as modes_tab:
                    mode = gr.Radio(list(modes.MODES), value=modes.TXT2IMG, label="Mode", elem_id="mode",
                                    info="img2img: from the init image; inpaint: repaint where the mask is white")
                    strength = gr.Slider(0.05, 1, value=0.75, step=0.05, label="Strength (denoising)",
                                         elem_id="strength")
                    with gr.Row():
                        init_image = gr.Image(type="pil", label="Init image", elem_id="init-image", format="png")
                        mask_image = gr.Image(type="pil", label="Mask (white: repaint)", elem_id="mask-image",
                                              format="png", image_mode="L")
                with gr.Tab("A/B"):
                    ab_modes = ["adapters"] + (["model"] if studio.compare_slot else [])
                    ab_mode = gr.Radio(ab_modes, value="adapters", label="Compare",
                                       info="adapters: without vs with the mix; model: --model vs --compare")
                    ab_btn = gr.Button("Compare (same seed)", elem_id="compare")
                    gr.Markdown("A and B show side by side above the images, large; what the A/B model cannot hold "
                                "of the mix is named under them and B runs the rest.")
                with gr.Tab("Read parameters"):
                    png = gr.File(label="An image with infotext", file_types=["image"], elem_id="read-png")
                    read_btn = gr.Button("Read", elem_id="read")
                    read_text = gr.Textbox(label="parameters", lines=4)
                    read_json = gr.JSON(label="parsed", elem_id="read-json")
                    send_btn = gr.Button("Send to Generate", elem_id="send")
            with gr.Column(scale=6, min_width=340):
                # A/B: the two images side by side, large (shown once a comparison ran; Generate hides it again)
                with gr.Column(visible=False, elem_id="ab-view") as ab_view:
                    with gr.Row(equal_height=True):
                        img_a = gr.Image(label="A", interactive=False, format="png", elem_id="ab-a",
                                         height="calc(100vh - 260px)")
                        img_b = gr.Image(label="B", interactive=False, format="png", elem_id="ab-b",
                                         height="calc(100vh - 260px)")
                    ab_info = gr.Textbox(label="A/B", lines=3, elem_id="ab-info")
                # the whole image at its aspect ratio ("contain", never cropped), high enough to fill the screen
                gallery = gr.Gallery(label="Images", columns=1, object_fit="contain",
                                     elem_id="gallery", format="png")
                info = gr.Textbox(label="Parameters (infotext) and notes", lines=4, elem_id="infotext")
                history = gr.Gallery(label="History of this session (click to recall)", columns=6, height=170,
                                     object_fit="contain", allow_preview=False, elem_id="history", format="png")
                history_state = gr.State([])
                jobs_state = gr.State(0)

        gen_inputs = [prompt, negative, steps, guidance, width, height, sampler, batch, seed, randomize, mix_box,
                      fused, transport, control, extractor, control_scale, class_label, mode, init_image, mask_image,
                      strength]

        def request(p, neg, st, g, w, h, samp, b, s, rnd, mix, fu, tr, ctrl, ex, cs, cl, md=modes.TXT2IMG, im=None,
                    mk=None, sg=0.75) -> Request:
            return Request(prompt=p or "", negative=neg or "", steps=st, guidance=g, width=w, height=h,
                           sampler=samp or "", batch=b, seed=s if s is not None else 0, randomize=bool(rnd),
                           mix=library.parse_mix(mix), fused=bool(fu), transport=bool(tr), control=ctrl,
                           extractor=ex or "none", control_scale=cs if ctrl is not None else None,
                           class_label=cl, mode=md or modes.TXT2IMG, image=im, mask=mk, strength=sg)

        def collect(ids: list[str], selection: rows.Selection, *values: Any) -> tuple[str, rows.Selection]:
            """The mix (JSON) from the selection with the slots' values folded in by identity."""
            selection = rows.merge(selection, ids, values[:MAX_ROWS], values[MAX_ROWS:])
            return json.dumps(rows.mix(selection)), selection

        row_inputs = [ids_state, selection_state, *enables, *weights]

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

        def busy(jobs: int) -> str:
            return "ready" if jobs <= 0 else (f"⏳ busy: {jobs} job(s) running or waiting (each one's place in the "
                                              "queue shows on the images)")

        def enqueue(jobs: int, *row_values: Any) -> tuple:
            """A Generate click: the mix, and one more job of this page in the queue."""
            return (*collect(*row_values), jobs + 1, busy(jobs + 1))

        def finished(jobs: int) -> tuple[int, str]:
            return max(jobs - 1, 0), busy(jobs - 1)

        def remember(hist: list[dict[str, Any]], images: Any, seed: Any, text: str) -> tuple[list, list]:
            """The new images at the end of this session's history, with their infotext for recall."""
            hist = [*hist, *[{"path": _path(item), "caption": f"#{len(hist) + i + 1} · seed {seed}",
                              "text": (text or "").split("\n\n")[0]} for i, item in enumerate(images or [])]]
            return hist, [(h["path"], h["caption"]) for h in hist]

        @errors
        def compare(*args: Any) -> tuple:
            """A/B at one seed; returns (image A, image B, description)."""
            *gen_args, mode = args
            a, b = studio.compare(request(*gen_args), mode)
            what = ("A: no adapters, B: the mix" if mode == "adapters" else
                    f"A: {studio.main.label}, B: {studio.compare_slot.label if studio.compare_slot else ''}")
            return str(a.images[0]), str(b.images[0]), f"{what} · seed {a.seed}\n" + "\n".join(a.notes + b.notes)

        def draw(listing: list[dict[str, Any]], q: str, selection: rows.Selection, notes: list[str]) -> list[Any]:
            slots, summary = rows.layout(listing, q, selection)
            summary += "".join(f"\n- {n}" for n in notes)
            bundle_keys = [e["key"] for e in listing if e["kind"] == "bundle"]
            return [[sl.ident for sl in slots], selection, summary,
                    *[gr.update(value=sl.header, visible=bool(sl.header)) for sl in slots],
                    *[gr.update(visible=bool(sl.ident)) for sl in slots],
                    *[gr.update(label=sl.label, info=sl.info, interactive=sl.usable, value=sl.enabled)
                      for sl in slots],
                    *[gr.update(value=sl.weight) for sl in slots], gr.update(choices=bundle_keys)]

        def redraw(listing: list[dict[str, Any]], q: str, ids: list[str], selection: rows.Selection,
                   *values: Any) -> list[Any]:
            """The rows for ``listing`` and the filter ``q``, the slots' values first folded into the selection."""
            selection = rows.merge(selection, ids, values[:MAX_ROWS], values[MAX_ROWS:])
            selection, notes = rows.prune(selection, listing)
            return draw(listing, q, selection, notes)

        def mix_to_rows(listing: list[dict[str, Any]], q: str, mix: str) -> list[Any]:
            """The rows showing a loaded mix (it replaces the selection)."""
            selection, notes = rows.from_mix(listing, json.loads(mix) if mix else [])
            return draw(listing, q, selection, notes)

        def infotext_to_rows(listing: list[dict[str, Any]], q: str, parsed: Any) -> list[Any]:
            """The rows ticked as an image's infotext says (its adapters and weights replace the selection)."""
            parsed = parse_infotext(parsed) if isinstance(parsed, str) else parsed
            items = parsed.get("adapters", []) if isinstance(parsed, dict) else []
            return mix_to_rows(listing, q, json.dumps(items))

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

        @errors
        def read_parameters(file: Any) -> tuple[str, dict[str, Any]]:
            """The infotext of an uploaded image and its parsed fields."""
            if file is None:
                return "", {}
            text = read_png_parameters(file if isinstance(file, str) else file.name)
            return text, parse_infotext(text) if text else {"note": "this image carries no 'parameters' chunk"}

        def send_to_generate(parsed: dict[str, Any]) -> list[Any]:
            """The controls as an infotext says (`recall.settings`); what it cannot put back is a warning."""
            values, notes = recall.settings(parsed if isinstance(parsed, dict) else {}, studio.main,
                                            studio.stored_image)
            for note in notes:
                gr.Warning(note)
            return [values.get(name, gr.skip()) for name in recall.CONTROLS]

        row_outputs = [ids_state, selection_state, row_summary, *headers, *groups, *enables, *weights, bundle_pick]
        redraw_inputs = [library_json, query, ids_state, selection_state, *enables, *weights]
        # every click queues one job (Gradio's default "once" dropped a click while a job ran), one job at a time
        recall_outputs = [prompt, negative, steps, guidance, width, height, sampler, seed, randomize, class_label,
                          fused, transport, extractor, control_scale, control, mode, strength, init_image,
                          mask_image]  # recall.CONTROLS, in order

        def recall_history(hist: list[dict[str, Any]], evt: gr.SelectData) -> list[Any]:
            """A history image back in the result view, its settings back in the controls."""
            entry = hist[evt.index]
            return [[entry["path"]], entry["text"], *send_to_generate(parse_infotext(entry["text"]))]

        gen_event = gen_btn.click(enqueue, [jobs_state, *row_inputs], [mix_box, selection_state, jobs_state, status],
                                  api_visibility="private", queue=False, trigger_mode="multiple").then(
            generate, gen_inputs, [gallery, used_seed, info, condition], api_name="generate",
            concurrency_id="model", concurrency_limit=1, trigger_mode="multiple")
        gen_event.then(finished, jobs_state, [jobs_state, status], api_visibility="private", queue=False)
        gen_event.success(lambda: gr.update(visible=False), None, ab_view, api_visibility="private", queue=False)
        gen_event.success(remember, [history_state, gallery, used_seed, info], [history_state, history],
                          api_visibility="private", queue=False)
        history.select(recall_history, history_state, [gallery, info, *recall_outputs], api_visibility="private",
                       queue=False).then(infotext_to_rows, [library_json, query, info], row_outputs,
                                         api_visibility="private", queue=False)
        reuse_btn.click(lambda s: (s, False), used_seed, [seed, randomize], api_visibility="private", queue=False)
        cancel_btn.click(lambda: (0, busy(0)), None, [jobs_state, status], api_visibility="private", queue=False)
        ab_event = ab_btn.click(collect, row_inputs, [mix_box, selection_state], api_visibility="private",
                                queue=False).then(
            compare, [*gen_inputs, ab_mode], [img_a, img_b, ab_info], api_name="compare",
            concurrency_id="model", concurrency_limit=1)
        ab_event.success(lambda: gr.update(visible=True), None, ab_view, api_visibility="private", queue=False)
        cancel_btn.click(studio.cancel, None, None, api_name="cancel", queue=False, cancels=[gen_event, ab_event])
        # the rows are drawn again from the folder on every page load and Refresh, the selection carried by identity
        demo.load(lambda: list_adapters(), None, library_json, api_visibility="private", queue=False).then(
            redraw, redraw_inputs, row_outputs, api_visibility="private", queue=False)
        refresh.click(list_adapters, None, library_json, api_name="list_adapters").then(
            redraw, redraw_inputs, row_outputs, api_visibility="private", queue=False)
        query.change(redraw, redraw_inputs, row_outputs, api_visibility="private", queue=False)
        save_btn.click(collect, row_inputs, [mix_box, selection_state], api_visibility="private", queue=False).then(
            save_mix, [mix_name, mix_box, fused, save_as], [mix_msg, library_json], api_name="save_mix",
            concurrency_id="model", concurrency_limit=1).then(
            redraw, redraw_inputs, row_outputs, api_visibility="private", queue=False)
        load_btn.click(load_mix, bundle_pick, [mix_box, fused, mix_msg], api_name="load_mix").then(
            mix_to_rows, [library_json, query, mix_box], row_outputs, api_visibility="private", queue=False)
        read_btn.click(read_parameters, png, [read_text, read_json], api_name="read_parameters")
        send_btn.click(send_to_generate, read_json, recall_outputs, api_visibility="private").then(
            infotext_to_rows, [library_json, query, read_json], row_outputs, api_visibility="private", queue=False)
        # the model dropdown: another model without a restart; the mix is re-validated for it (Slot.revalidate)
        model_outputs = [title, prompt, negative, class_label, steps, guidance, width, height, sampler, modes_tab,
                         mode]

        @errors
        def switch_model(label: str, mix: str) -> list[Any]:
            """Run the model ``label`` names; returns (the mix kept for it as JSON, notes, the controls' updates)."""
            kept, notes = studio.switch_model(label, library.parse_mix(mix))
            kept_json = json.dumps([{"key": i.key, "weight": i.weight} for i in kept])
            return [kept_json, "\n".join(f"- {n}" for n in notes) or f"now running {studio.main.label}",
                    *controls.model_controls(studio)]

        model_pick.input(collect, row_inputs, [mix_box, selection_state], api_visibility="private",
                         queue=False).then(
            switch_model, [model_pick, mix_box], [mix_box, mix_msg, *model_outputs], api_name="switch_model",
            concurrency_id="model", concurrency_limit=1).then(
            list_adapters, None, library_json, api_visibility="private", queue=False).then(  # badges: new model
            mix_to_rows, [library_json, query, mix_box], row_outputs, api_visibility="private", queue=False)
        refresh_models.click(lambda: list(studio.model_choices()), None, models_json, api_name="list_models").then(
            lambda labels: gr.update(choices=labels), models_json, model_pick, api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the studio (127.0.0.1 unless told otherwise); returns the Blocks (already running when block=False)."""
    demo = build_demo(studio)
    studio.out.mkdir(parents=True, exist_ok=True)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                allowed_paths=[str(studio.out)], show_error=True, js=KEYS_JS, css=CSS)
    return demo


