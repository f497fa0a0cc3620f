"""`reel serve`: the OpenAI Videos API on Ray Serve, rendering with the batch pipeline's code.

    HTTP ─ VideoAPI (FastAPI ingress, 1 replica)   auth, validation, durable jobs (SQLite), metrics
             │  dispatcher: one task per render slot, jobs in creation order
             └─ Renderer (N replicas, GPU or CPU)   recaption → render → MP4 + thumbnail + metadata
                                                    (RecaptionUDF / RenderUDF / ClipWriter rows)

A create is validated exactly as a manifest row is (`pipeline.batch.manifest.validate` against the
model's GridLimits), written to the job store, answered `queued`, and rendered by the same per-row
methods the Ray Data stages use, into the same layout as `reel render` under OUT (videos/{id}.mp4,
thumbnails/{id}.jpg, metadata/{id}.parquet; plus spritesheets/{id}.jpg for the API's spritesheet
variant). A job whose metadata already records its request hash is not rendered again, so jobs
taken up again after a restart never render twice.

Endpoints (paths, fields and status values of OpenAI's Videos API), each a generation mode of
the batch pipeline (`pipeline/stages/modes.py`):

    POST /v1/videos               text→video; image→video with `input_reference` (an uploaded
                                  image or {"image_url": https URL or data URL}); a storyboard
                                  with our `shots` extra field
    POST /v1/videos/{id}/remix    remix of a stored video under a new prompt (`strength` extra)
    POST /v1/videos/extensions    extend a video (uploaded, or {"id": …}) by `seconds`; extras
                                  `direction` (forward | backward) and `extension_only`
    POST /v1/videos/edits         remix of a video (uploaded, or {"id": …}) under a new prompt
    GET /v1/videos, GET|DELETE /v1/videos/{id}, GET /v1/videos/{id}/content?variant=
    video|thumbnail|spritesheet; /v1/videos/characters is validated, then refused (400
    `mode_not_available`: the model has no character conditioning).

Uploaded and fetched inputs are checked when the request arrives (type, size, decodability) and
stored under OUT/inputs/{id}/; the render reads them from there through the batch pipeline's
inputs stage, so the render replicas read only URIs the API wrote. An `image_url` on a private,
loopback or link-local address is refused unless `allow_private_urls` is set.
/healthz and /readyz need no key; everything else, /metrics included, a bearer key from
REEL_API_KEYS or the key file.

Configuration is `ServeConfig`: `reel serve` options, or REELFORGE_* environment variables for
the application builder `pipeline.serve.app:app_from_env` (what cluster/rayservice.yaml imports).
Replica counts, CPUs/GPUs per replica and autoscaling are fields of it, and a Serve config file's
`deployments:` section can override them per deployment (names `VideoAPI`, `Renderer`).

The modules:

    app.py         build_app (VideoAPI → Renderer), run (`reel serve`), app_from_env (the builder)
    config.py      ServeConfig, the API keys (as hashes)
    api.py         VideoAPI: auth, job admission, the dispatcher, deletes
    http.py        its FastAPI app: routes, error shapes, auth and metrics middleware, bodies
    schemas.py     the OpenAPI request bodies and bearer security
    requests.py    request fields → a validated clip; reference images, URL fetches, uploaded videos
    errors.py      APIError, OpenAI's error shape
    renderer.py    Renderer: recaption → render → write; the spritesheet, the output URIs
    metrics.py     the Prometheus metrics
    jobs_store.py  the SQLite job store
"""
