"""The Gradio web UI: a thin client of `ldm_core.service.Service`.

`ui.app.create_ui(ctx)` builds the Blocks (one module per tab); `webui.py` launches it. Nothing here is
imported by the engine or by `api/`, and nothing here imports `api/`.
"""
