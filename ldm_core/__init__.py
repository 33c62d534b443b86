"""ldm_core: the engine of the web UI: offline model loading, samplers, one denoising loop, jobs, infotext.

The engine imports no UI or HTTP code; the web UI, the REST API and the CLI are thin clients of `Engine` and
`JobQueue`. Extensions use only `ldm_core.extension_api`.
"""

__version__ = "0.1.0"
