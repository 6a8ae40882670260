"""Request bodies of the OpenAI-compatible API, checked strictly, and OpenAI-style error bodies.

Types are strict (no "5" for 5, no true for 1) and unknown fields are refused, as OpenAI does, so a misspelt
diffusion knob is an error rather than silently ignored. OpenAI fields that mean nothing to a diffusion sampler
(temperature, top_p, penalties, user, metadata, ...) are accepted, range-checked and ignored: the sampler's
temperature follows its own schedule (t_max -> t_min per canvas). Fields whose answer would be wrong if ignored
(n > 1, logprobs, logit_bias, forced tool choice, echo, best_of > 1) give a 400. `response_format` json_object /
json_schema (chat) and `suffix` (completions: infill) are served by jobs.py.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_DENOISING_STEPS = 1024  # server policy: bounds the work one request can ask for per canvas
MAX_STOP_STRINGS = 16
MAX_BODY_BYTES = 8 << 20
TOOL_CHOICES = "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": NAME}}"

PositiveInt = Annotated[int, Field(ge=1)]
_Stop = Annotated[str, Field(min_length=1, max_length=1000)]  # an empty one would match before every character
StopStrings = _Stop | Annotated[list[_Stop], Field(max_length=MAX_STOP_STRINGS)] | None


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # newer OpenAI options are harmless to ignore
    include_usage: bool = False


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None


class _Common(_Strict):
    model: str
    max_tokens: PositiveInt | None = None
    stop: StopStrings = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None  # torch.Generator's range
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # accepted and ignored (see the module docstring)
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # diffusion knobs (engine.stream's names); null disables t_min/t_max and the stop thresholds
    max_denoising_steps: Annotated[int, Field(ge=1, le=MAX_DENOISING_STEPS)] | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    # past canvases kept per row ([threshold, L] ids): beyond the step limit it could never be met anyway
    stability_threshold: Annotated[int, Field(le=MAX_DENOISING_STEPS)] | None = None
    confidence_threshold: float | None = None
    acceptance: str | None = None  # entropy:B | confidence:T | quota:K | linear-quota
    sampling: Literal["fast", "reference"] = "fast"
    # generate exactly max_tokens tokens, text past end tokens included (vLLM's name); infill: a middle that long
    ignore_eos: bool = False
    dgemma_drafts: bool = False  # streaming only: also send each canvas as it converges

    @field_validator("n", "stream", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_the_default(cls, value, info):
        """OpenAI's API (and its client's types) take null for these, meaning the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    def knobs(self) -> dict:
        """The diffusion knobs this request set explicitly (an explicit null is a value)."""
        names = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                 "confidence_threshold")
        return {k: getattr(self, k) for k in names if k in self.model_fields_set}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    path: ClassVar[str] = "/v1/chat/completions"
    messages: list[dict[str, Any]]
    max_completion_tokens: PositiveInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    reasoning_effort: str | None = None  # "none" turns thinking off, any other value on
    # accepted and ignored
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None


class CompletionRequest(_Common):
    path: ClassVar[str] = "/v1/completions"
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON syntax, but no 64-bit float holds it (Python reads inf)
        raise ValueError(f"the number {text[:40]} is out of range for a 64-bit float")
    return value


def parse_body(raw: bytes, model: type[_Common]) -> _Common:
    """Request bytes -> a checked request, or ApiError(400) saying which field is wrong and why."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e, model) from None


def _from_validation(e: ValidationError, model: type[_Common]) -> ApiError:
    errors = e.errors(include_url=False)
    other = next((m for m in (ChatCompletionRequest, CompletionRequest) if m is not model), None)
    wrong_path = [x for x in errors if x["type"] == "extra_forbidden" and other and x["loc"][0] in other.model_fields]
    err = (wrong_path or errors)[0]  # a field of the other endpoint first: 'prompt' on chat says more than 'missing'
    loc = [str(p) for p in err["loc"]]
    field = loc[0] if loc else None
    if wrong_path:
        return ApiError(400, f"{field!r} is a {other.path} field, which {model.path} does not take: use "
                             f"{other.path} for it", param=field, code="unknown_field")
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {field!r}: dgemma takes the OpenAI fields plus its diffusion knobs "
                             "(max_denoising_steps, entropy_bound, t_min, t_max, stability_threshold, "
                             "confidence_threshold, acceptance, sampling, ignore_eos, dgemma_drafts)",
                        param=field, code="unknown_field")
    if err["type"] == "missing":
        return ApiError(400, f"missing required field {'.'.join(loc)!r}", param=field, code="missing_field")
    shown = json.dumps(err.get("input"), default=str)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    if field in _UNION_HINTS:  # pydantic reports one error per union member; say what is expected instead
        return ApiError(400, f"invalid value for {field!r}: expected {_UNION_HINTS[field]} (got {shown})",
                        param=field, code="invalid_value")
    return ApiError(400, f"invalid value for {'.'.join(loc)!r}: {err['msg']} (got {shown})", param=field,
                    code="invalid_value")


_UNION_HINTS = {"stop": f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                "prompt": "a string, a list of one string, or a list of token ids",
                "tool_choice": TOOL_CHOICES}
