"""Requests -> worker jobs: the checks that need the model (chat template, knob values, context length) and the
engine.stream options. Every refusal is an ApiError with the field at fault."""

from __future__ import annotations

import json

from ..argtypes import accept_rule
from ..config import ConfigError
from ..engine.generate import check_rule_choice
from .schemas import TOOL_CHOICES, ApiError, ChatCompletionRequest, CompletionRequest
from .worker import Job

KNOBS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")


def _unsupported(what: str, param: str) -> ApiError:
    return ApiError(400, f"{what} is not supported by dgemma's server", param=param, code="unsupported")


def _common_checks(req) -> None:
    if req.n != 1:
        raise ApiError(400, f"n={req.n}: only one choice per request is supported (n=1); send several requests",
                       param="n", code="unsupported")
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    if req.dgemma_drafts and not req.stream:
        raise ApiError(400, "dgemma_drafts needs stream=true", param="dgemma_drafts")
    if req.stream_options is not None and not req.stream:  # as OpenAI: usage is in every non-streamed response
        raise ApiError(400, "stream_options is only allowed with stream=true (a non-streamed response always "
                            "carries usage)", param="stream_options", code="invalid_value")


def chat_job(engine, req: ChatCompletionRequest, default_max_tokens) -> Job:
    _common_checks(req)
    if req.logprobs or req.top_logprobs:
        raise _unsupported("logprobs", "logprobs")
    _check_tool_choice(req.tool_choice)
    _check_tools(req.tools)
    if None not in (req.max_tokens, req.max_completion_tokens) and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_completion_tokens")
    flags = {v for v in (req.enable_thinking, req.chat_template_kwargs and req.chat_template_kwargs.enable_thinking)
             if v is not None}
    if len(flags) > 1:
        raise ApiError(400, "enable_thinking and chat_template_kwargs.enable_thinking disagree",
                       param="enable_thinking")
    thinking = flags.pop() if flags else req.reasoning_effort not in (None, "none")
    tools = req.tools if req.tool_choice != "none" else None
    try:
        ids = engine.require_tokenizer().encode_chat(req.messages, add_generation_prompt=True,
                                                     enable_thinking=thinking, tools=tools)
    except ValueError as e:  # ChatFormatError: says which message or tool is wrong
        raise ApiError(400, str(e), param="tools" if str(e).startswith("tools") else "messages") from None
    job = _options(engine, req, ids, req.max_completion_tokens or req.max_tokens, default_max_tokens, "messages")
    if req.response_format is not None:
        if req.ignore_eos:  # the layout decides the document's length, so "exactly max_tokens" cannot hold
            raise ApiError(400, "ignore_eos cannot be combined with response_format: the JSON document ends where its "
                                "layout ends, not at max_tokens", param="ignore_eos")
        if req.stop_list():  # a stop string could cut the document (engine/structured.py refuses it too)
            raise ApiError(400, "stop strings cannot be combined with response_format: they could cut the JSON "
                                "document", param="stop")
        _structured(engine, job, req.response_format, req.max_completion_tokens or req.max_tokens)
    return job


def _check_tool_choice(choice) -> None:
    """OpenAI's valid values; of those dgemma cannot force a call ('required', a named function)."""
    if choice in (None, "auto", "none"):
        return
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
        choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
    if choice == "required" or named:
        raise ApiError(400, f"tool_choice {json.dumps(choice)[:80]} (forcing a tool call) is not supported by "
                            "dgemma's server: use 'auto' (the model decides) or 'none'", param="tool_choice",
                       code="unsupported")
    raise ApiError(400, f"invalid value for 'tool_choice': expected {TOOL_CHOICES} (got {json.dumps(choice)[:80]})",
                   param="tool_choice", code="invalid_value")


def _check_tools(tools) -> None:
    """The fields the chat template renders must have OpenAI's types: the template prints any value, so a schema
    sent as a JSON string (parameters=json.dumps(schema)) would reach the model as one quoted string."""
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            continue  # the chat format names it (text/chat.py normalize_tools)
        if tool.get("type", "function") != "function":
            raise ApiError(400, f"tools[{i}].type is {json.dumps(tool['type'])[:40]}: only 'function' tools are "
                                "supported", param="tools", code="invalid_value")
        fn = tool.get("function", tool)
        for name, kind, what in (("parameters", dict, "a JSON schema object"), ("description", str, "a string")):
            value = fn.get(name) if isinstance(fn, dict) else None
            if value is not None and not isinstance(value, kind):
                where = f"tools[{i}].function.{name}" if "function" in tool else f"tools[{i}].{name}"
                raise ApiError(400, f"{where} must be {what}, got {type(value).__name__} "
                                    f"{json.dumps(value)[:60]}", param="tools", code="invalid_value")


def _structured(engine, job: Job, response_format: dict, max_tokens) -> None:
    """response_format json_object / json_schema -> a JSON plan in the job's options (valid by construction)."""
    from ..engine.structured import structured_options

    options = {**job.options, "response_format": response_format}
    if max_tokens is None:  # the layout decides the length, not the server's default
        options.pop("max_tokens")
    try:
        job.options = structured_options(engine, options)
        engine.check_context(len(job.prompt_ids), job.options["max_tokens"])
    except ValueError as e:  # SchemaError too: says which schema keyword or value is unsupported
        raise ApiError(400, f"response_format: {e}", param="response_format", code="invalid_value") from None


def completion_job(engine, req: CompletionRequest, default_max_tokens) -> Job:
    _common_checks(req)
    for name, value, ok in (("echo", req.echo, False), ("logprobs", req.logprobs, None)):
        if value != ok:
            raise _unsupported(name, name)
    if req.best_of not in (None, 1):
        raise _unsupported("best_of > 1", "best_of")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"{len(prompt)} prompts: one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if req.suffix is not None:  # infill: the middle between prompt and suffix (engine/infill.py)
        if not isinstance(prompt, str):
            raise ApiError(400, "suffix (infill) needs a text prompt, not token ids", param="prompt")
        if req.stop_list():
            raise ApiError(400, "stop strings cannot be combined with suffix: the middle is bounded by the suffix",
                           param="stop")
        if req.dgemma_drafts:  # the middle's length is chosen only at the end: there is no one canvas to show
            raise ApiError(400, "dgemma_drafts cannot be combined with suffix: an infill races several middle "
                                "lengths and sends the chosen middle once, at the end", param="dgemma_drafts")
        job = _options(engine, req, engine.prompt_ids(prompt), req.max_tokens, default_max_tokens, "prompt")
        job.infill, o = (prompt, req.suffix), job.options  # the options become engine.infill's
        limit = o.pop("max_tokens")
        del o["stop"]
        o.pop("eos_token_id", None)  # the middle never holds a stop id (infill.middle_class)
        # ignore_eos: the middle is exactly max_tokens long (no length search), as a completion would be
        o["middle_tokens" if req.ignore_eos else "max_middle_tokens"] = limit
        return job
    if isinstance(prompt, str):
        ids = engine.prompt_ids(prompt)
    else:
        vocab = engine.config.vocab_size
        if not prompt or not all(0 <= i < vocab for i in prompt):
            raise ApiError(400, f"a token-id prompt must be non-empty ids in [0, {vocab})", param="prompt")
        ids = list(prompt)
    return _options(engine, req, ids, req.max_tokens, default_max_tokens, "prompt")


def _options(engine, req, ids: list[int], max_tokens, default_max_tokens, prompt_param: str) -> Job:
    """Checks that need the model (knob values, context length), then the engine.stream options."""
    knobs = req.knobs()
    if req.ignore_eos:
        knobs["eos_token_id"] = []
    try:
        gen = engine.generation_settings(**knobs)
    except ConfigError as e:
        raise ApiError(400, str(e), param=next((k for k in KNOBS if str(e).startswith(k)), None),
                       code="invalid_value") from None
    if max_tokens is None:  # as many as fit, up to the server's default
        L, context = engine.config.canvas_length, engine.config.max_position_embeddings
        # as many as fit (none when not even one canvas does: check_context then says so)
        max_tokens = min(default_max_tokens or gen.max_new_tokens, max(0, (context - len(ids)) // L * L))
    try:
        engine.check_context(len(ids), max_tokens)
    except ValueError as e:
        raise ApiError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
    try:
        accept = None if req.acceptance is None else accept_rule(req.acceptance, gen.max_denoising_steps)
        check_rule_choice(accept, "entropy_bound" in knobs)
    except ValueError as e:
        raise ApiError(400, str(e), param="acceptance", code="invalid_value") from None
    options = {"max_tokens": max_tokens, "stop": req.stop_list() or None, "seed": req.seed,
               "sampling": req.sampling, "accept": accept, **knobs}
    return Job(ids, options, drafts=req.dgemma_drafts)
