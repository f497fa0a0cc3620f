"""The OpenAPI document's request bodies (JSON or a form, as the SDKs send them) and its bearer auth."""

from __future__ import annotations

from typing import Any

from pipeline.batch.row_fields import MAX_PROMPT_CHARS

_STR = {"type": "string"}
_STEPS, _GUIDANCE = {"type": "integer", "minimum": 1}, {"type": "number", "minimum": 0}
_ADAPTER = {"type": "object", "required": ["uri"], "additionalProperties": False,
            "properties": {"uri": _STR, "scale": {"type": "number"}}}
_LORA = {"description": "LoRA adapters (diffusers Wan folders): a safetensors file's URI, an object {uri, scale}, "
                        "or a list of them", "oneOf": [_STR, _ADAPTER, {"type": "array", "items": {
                            "oneOf": [_STR, _ADAPTER]}}]}
_EXTRA_PROPERTIES = {  # ours, through the SDK's extra_body, and vLLM-Omni's names for two of them
    "seed": {"type": "integer", "minimum": 0}, "steps": _STEPS, "guidance": _GUIDANCE, "negative_prompt": _STR,
    "blur_faces": {"type": "boolean"}, "lora": _LORA,
    "step_cache": {"type": "number", "minimum": 0,
                   "description": "first-block step cache threshold (reel render --step-cache); absent: off"},
    "num_inference_steps": {**_STEPS, "description": "vLLM-Omni's name for steps"},
    "guidance_scale": {**_GUIDANCE, "description": "vLLM-Omni's name for guidance"}}
_LENGTH_PROPERTIES = {  # create only: the frame count itself (instead of seconds) and the frame rate
    "frames": {"type": "integer", "minimum": 1, "description": "the clip's frame count, on the model's grid "
                                                               "(4k+1 for Wan); instead of seconds"},
    "num_frames": {"type": "integer", "minimum": 1, "description": "vLLM-Omni's name for frames"},
    "fps": {"type": "integer", "minimum": 1}}
_PROMPT = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
CREATE_SCHEMA = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
    "prompt": _PROMPT, "model": _STR,
    "seconds": {"type": "string", "example": "2"}, "size": {"type": "string", "example": "64x64"},
    "input_reference": {"oneOf": [{"type": "string", "format": "binary"}, {
        "type": "object", "properties": {"image_url": _STR, "file_id": _STR}, "additionalProperties": False}]},
    **_EXTRA_PROPERTIES, **_LENGTH_PROPERTIES,
    "shots": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["prompt", "seconds"], "additionalProperties": False,
        "properties": {"prompt": _STR, "seconds": {"type": "number", "exclusiveMinimum": 0}}}}}}
_STRENGTH = {"strength": {"type": "number", "minimum": 0, "maximum": 1}}
REMIX_SCHEMA = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
    "prompt": _PROMPT, "model": _STR, **_EXTRA_PROPERTIES, **_STRENGTH}}
_VIDEO_REF = {"oneOf": [{"type": "string", "format": "binary"},
                        {"type": "object", "required": ["id"], "properties": {"id": _STR}}]}
EDIT_SCHEMA = {"type": "object", "required": ["prompt", "video"], "additionalProperties": False, "properties": {
    "prompt": _PROMPT, "model": _STR, "video": _VIDEO_REF, **_EXTRA_PROPERTIES, **_STRENGTH}}
EXTEND_SCHEMA = {"type": "object", "required": ["prompt", "seconds", "video"], "additionalProperties": False,
                  "properties": {"prompt": _PROMPT, "model": _STR, "seconds": _STR, "video": _VIDEO_REF,
                                 **_EXTRA_PROPERTIES, "direction": {"type": "string", "enum": ["forward", "backward"]},
                                 "extension_only": {"type": "boolean"}}}


def body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A request body taken as JSON or as a form (uploads), as the SDKs send them."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": schema}}}}


def add_bearer_security(app) -> None:
    """Declare bearer auth in the OpenAPI document (clients and fuzzers read it from there)."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
