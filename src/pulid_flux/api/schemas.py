"""fal's ``fal-ai/flux-pulid`` wire protocol as pydantic models (input, output, queue statuses).

Static bounds live here so that ``/openapi.json`` shows them; limits an operator can change
(custom image size bounds, ``num_images``, reference count) are checked by ``check_limits``
against :class:`~pulid_flux.config.Settings` and reported in the same 422 shape.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import Settings
from . import safe_json

# fal's named sizes, width x height.
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

ImageSizeName = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]


class ImageSize(BaseModel):
    """A custom size. Bounds are the server's `min_image_size`/`max_image_size` settings
    (default 256..2048); the value is rounded to the nearest multiple of `image_size_multiple`
    (default 16), which the FLUX latent grid needs."""

    model_config = ConfigDict(extra="forbid")
    width: int = Field(..., ge=1, description="Pixels; server bounds apply (default 256..2048).")
    height: int = Field(..., ge=1, description="Pixels; server bounds apply (default 256..2048).")


class FluxPulidInput(BaseModel):
    """Input of `fal-ai/flux-pulid`. Unknown fields are ignored, as fal does."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., description="The prompt to generate an image from.")
    reference_image_url: str = Field(
        ..., description="URL (http/https, data: URI, or a file URL of this server) of the face."
    )
    image_size: Union[ImageSizeName, ImageSize] = Field("landscape_4_3")
    num_inference_steps: int = Field(20, ge=1, le=50)
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1, description="Random when omitted.")
    guidance_scale: float = Field(4.0, ge=0, le=20)
    negative_prompt: str = Field("")
    sync_mode: bool = Field(
        False, description="Return images as data URIs and keep no history of the request."
    )
    start_step: int = Field(0, ge=0, le=50, description="Step from which the identity is injected.")
    true_cfg: float = Field(1.0, ge=1, le=10, description="> 1 enables true CFG (slower).")
    id_weight: float = Field(1.0, ge=0, le=1)
    enable_safety_checker: bool = Field(True)
    max_sequence_length: Literal["128", "256", "512"] = Field("128")
    # --- extensions beyond fal (absent = fal behaviour) ---
    reference_image_urls: Optional[list[str]] = Field(
        None, description="Extension: more faces, fused with reference_image_url's."
    )
    end_step: Optional[int] = Field(
        None, ge=1, le=50, description="Extension: step at which the identity injection stops."
    )
    num_images: int = Field(1, ge=1, description="Extension: images per request (server max).")
    output_format: Literal["jpeg", "png", "webp"] = Field("jpeg", description="Extension.")
    face_index: Optional[int] = Field(
        None, ge=0, le=31, description="Extension: which face of each reference, largest first."
    )
    enable_previews: bool = Field(
        False, description="Extension: status-stream events carry `preview`, a small JPEG data URI "
        "approximating the image while it denoises (off: nothing is computed or sent).",
    )
    preview_interval: int = Field(
        2, ge=1, le=50, description="Extension: steps between two previews (with enable_previews)."
    )
    acceleration: Literal["none", "regular", "high"] = Field(
        "none", description="Extension, as fal's FLUX endpoints: `regular` and `high` reuse the later "
        "transformer blocks' result when the first block's barely changed since the last step (First Block "
        "Cache; the identity is never carried over). Faster, slightly different images; `none` is exact.",
    )


class OutputImage(BaseModel):
    url: str
    width: int
    height: int
    content_type: str
    file_name: Optional[str] = None
    file_size: Optional[int] = None


class Timings(BaseModel):
    inference: float


class FluxPulidOutput(BaseModel):
    images: list[OutputImage]
    timings: Timings
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str


class LogEntry(BaseModel):
    message: str
    level: Literal["STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"] = "INFO"
    source: str = "USER"
    timestamp: str


class QueueStatus(BaseModel):
    """What `…/requests/{id}/status` returns; fal clients understand only these three states."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    logs: Optional[list[LogEntry]] = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    queue_position: Optional[int] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    preview: Optional[str] = Field(
        None, description="Extension, status stream only, when the request set enable_previews: "
        "the latest latent preview (JPEG data URI), in the event that follows it.",
    )


class SubmitResponse(BaseModel):
    status: Literal["IN_QUEUE"] = "IN_QUEUE"
    request_id: str
    gateway_request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int


def error_detail(field: Union[str, list], msg: str, type_: str, *, where: str = "body", **extra) -> dict:
    """One fal/FastAPI-style validation error entry; ``where`` is body, header or query."""
    loc = [where, *field] if isinstance(field, list) else [where, field]
    return {"loc": loc, "msg": msg, "type": type_, **extra}


def input_from_query(params: Mapping[str, list[str]]) -> FluxPulidInput:
    """The input of ``GET /run/…`` (the JS client's ``method: "get"`` sends it as query
    parameters). Objects and lists may come JSON-encoded, lists also as repeated keys; pydantic
    turns the strings into numbers and booleans. Errors name the field like a body's would, since
    the query carries the same input."""
    raw: dict[str, Any] = {}
    for name, values in params.items():
        field = FluxPulidInput.model_fields.get(name)
        if field is None or field.annotation is str:  # text stays text, even "[like this]"
            raw[name] = values[-1]
            continue
        parsed = [_json_or_text(v) for v in values]
        if _is_list(field.annotation):
            raw[name] = [x for v in parsed for x in (v if isinstance(v, list) else [v])]
        else:
            raw[name] = parsed[-1]
    try:
        return FluxPulidInput.model_validate(raw)
    except ValidationError as exc:
        from fastapi.exceptions import RequestValidationError

        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_input=False)]
        ) from None


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))


def _json_or_text(text: str) -> Any:
    if text[:1] in ("{", "["):
        try:
            return safe_json.loads(text)
        except ValueError:
            pass
    return text


# fal's object lifecycle: the JS client's storageSettings on submit/run (preference), and the
# lifecycle of an upload (JS initiate; Python's CDN upload sends both).
LIFECYCLE_PREFERENCE_HEADER = "x-fal-object-lifecycle-preference"
LIFECYCLE_HEADER = "x-fal-object-lifecycle"


def retention_from_header(value: Optional[str], server_ttl_s: float,
                          max_depth: int = safe_json.DEFAULT_MAX_DEPTH) -> Optional[float]:
    """Seconds to keep a request's result and files, from fal's object lifecycle header
    (``{"expiration_duration_seconds": N, "initial_acl": …}``); None keeps the server's
    ``result_ttl_s``, which also caps it: a client may shorten the retention, not extend it."""
    if not value:
        return None
    doc = safe_json.loads(value, max_depth=max_depth)
    if not isinstance(doc, dict):
        raise ValueError("must be a JSON object")
    seconds = doc.get("expiration_duration_seconds")
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError("expiration_duration_seconds must be a positive number")
    return float(seconds) if seconds < server_ttl_s else None


def resolve_size(value: Union[str, ImageSize], settings: Settings) -> tuple[int, int]:
    if isinstance(value, str):
        return IMAGE_SIZE_PRESETS[value]
    m = settings.image_size_multiple

    def snap(v: int) -> int:
        # Nearest multiple, kept inside the bounds.
        snapped = max(m, int(round(v / m)) * m)
        while snapped > settings.max_image_size:
            snapped -= m
        while snapped < settings.min_image_size:
            snapped += m
        return snapped

    return snap(value.width), snap(value.height)


def check_limits(inp: FluxPulidInput, settings: Settings) -> list[dict]:
    """Checks against operator-configurable limits; returns fal-style error entries."""
    errors: list[dict] = []
    if isinstance(inp.image_size, ImageSize):
        for name in ("width", "height"):
            v = getattr(inp.image_size, name)
            if not settings.min_image_size <= v <= settings.max_image_size:
                errors.append(
                    error_detail(
                        ["image_size", name],
                        f"Input should be between {settings.min_image_size} and "
                        f"{settings.max_image_size}",
                        "value_error",
                        ctx={"ge": settings.min_image_size, "le": settings.max_image_size},
                    )
                )
    if inp.num_images > settings.max_num_images:
        errors.append(
            error_detail(
                "num_images",
                f"Input should be less than or equal to {settings.max_num_images}",
                "less_than_equal",
                ctx={"le": settings.max_num_images},
            )
        )
    n_refs = 1 + len(inp.reference_image_urls or [])
    if n_refs > settings.max_reference_images:
        errors.append(
            error_detail(
                "reference_image_urls",
                f"At most {settings.max_reference_images} reference images in total",
                "too_long",
            )
        )
    for name in ("prompt", "negative_prompt"):
        if len(getattr(inp, name)) > settings.max_prompt_chars:
            errors.append(
                error_detail(
                    name,
                    f"String should have at most {settings.max_prompt_chars} characters",
                    "string_too_long",
                )
            )
    if not inp.prompt.strip():
        errors.append(error_detail("prompt", "The prompt must not be empty", "value_error"))
    if inp.end_step is not None and inp.end_step <= inp.start_step:
        errors.append(
            error_detail("end_step", "end_step must be greater than start_step", "value_error")
        )
    return errors
