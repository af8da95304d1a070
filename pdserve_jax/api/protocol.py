"""The OpenAI wire format, request side: the error a request gets (`ApiError`, in
OpenAI's error schema) and the parsing of each route's JSON body into what the
engine takes.

Every field a body may carry is either used, accepted as a no-op at its neutral
value (a penalty of 0, `best_of` equal to `n`), or refused with a 400 naming it:
nothing is silently ignored. Range checks are the engine's (`core.sampling`), whose
messages name the field too. No I/O and no engine here: the routes (`api.app`)
call these off the event loop.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, List, Optional, Sequence, Union

from pdserve_jax.core import sampling as validate
from pdserve_jax.core.sampling import SamplingParams

# OpenAI's defaults where the request leaves a field out.
DEFAULTS = dict(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, n=1, stream=False)
COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stop_token_ids", "ignore_eos", "n", "logprobs", "stream", "stream_options", "user",
          "presence_penalty", "frequency_penalty", "min_tokens")
COMPLETION_FIELDS = COMMON + ("prompt", "echo", "best_of")
CHAT_FIELDS = COMMON + ("messages", "max_completion_tokens", "top_logprobs",
                        "add_generation_prompt", "parallel_tool_calls")
UNSUPPORTED = ("suffix", "logit_bias", "tools", "tool_choice", "functions", "function_call",
               "response_format", "repetition_penalty")
STREAM_OPTIONS = ("include_usage", "continuous_usage_stats")


class ApiError(Exception):
  """A request the API refuses or could not serve: HTTP `status`, OpenAI's error
  `kind` (its `type` field), the field it names (`param`), and for 429 / 503 the
  seconds a client should wait (`retry_after`, sent as the Retry-After header)."""

  def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
               kind: str = "invalid_request_error", retry_after: Optional[float] = None):
    super().__init__(message)
    self.param, self.status, self.kind, self.retry_after = param, status, kind, retry_after

  def body(self) -> dict:
    """OpenAI's error object: message, type, param, code (here the HTTP status)."""
    return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                      "code": self.status}}


# A name kept for callers of the first version of this module.
BadRequest = ApiError


@dataclasses.dataclass
class Call:
  """A parsed completions or chat body."""
  prompt: Union[str, List[int], None]  # text or ids (completions); None for chat
  messages: Optional[List[dict]]  # chat: checked messages, content as text
  params: SamplingParams
  stream: bool = False
  include_usage: bool = False
  continuous_usage: bool = False
  echo: bool = False  # completions: the prompt (and its logprobs) before the output
  max_tokens_given: bool = True  # chat: False leaves it to the context's end
  add_generation_prompt: bool = True


def parse_json(raw: bytes) -> Any:
  """The body as JSON; ApiError 400 when it is not (deep nesting included)."""
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(f"the body is not valid JSON: {e}") from None
  except RecursionError:
    raise ApiError("the body is not valid JSON: nested too deeply") from None


def _int(body: dict, key: str) -> Optional[int]:
  v = body.get(key)
  if v is None:
    return None
  if not validate.is_int(v):
    raise ApiError(f"{key}: expected an integer, got {json.dumps(v)}", key)
  return int(v)


def _float(body: dict, key: str) -> Optional[float]:
  v = body.get(key)
  if v is None:
    return None
  if not validate.is_real(v):  # NaN and inf pass here; the engine's checks refuse them
    raise ApiError(f"{key}: expected a number, got {json.dumps(v)}", key)
  return float(v)


def _bool(body: dict, key: str, default: bool) -> bool:
  v = body.get(key)
  if v is None:
    return default
  if not isinstance(v, bool):
    raise ApiError(f"{key}: expected true or false, got {json.dumps(v)}", key)
  return v


def check_model(body: dict, names: Sequence[str]) -> None:
  """`model`, when given, must be one of `names` (the served name and its aliases)."""
  model = body.get("model")
  if model is not None and model not in names:
    raise ApiError(f"model: {model!r} is not served here; this server serves "
                   f"{names[0]!r}", "model", 404, "model_not_found")


def _check_keys(body: Any, fields: Sequence[str]) -> dict:
  if not isinstance(body, dict):
    raise ApiError("the body must be a JSON object")
  for key in body:
    if key in UNSUPPORTED:
      raise ApiError(f"{key}: not supported by this server", key)
    if key not in fields:
      raise ApiError(f"{key}: unknown field; known: {', '.join(fields)}", key)
  for key in ("presence_penalty", "frequency_penalty"):
    if _float(body, key) not in (None, 0.0):
      raise ApiError(f"{key}: not supported by this server (only 0)", key)
  if _int(body, "min_tokens") not in (None, 0):
    raise ApiError("min_tokens: not supported by this server (only 0)", "min_tokens")
  return body


def _stop(body: dict) -> tuple:
  stop = body.get("stop")
  if stop is None:
    return ()
  if isinstance(stop, str):
    return (stop,)
  if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
    return tuple(stop)
  raise ApiError("stop: expected a string or a list of strings", "stop")


def _common(body: dict, max_tokens: Optional[int], logprobs: Optional[int]) -> Call:
  """The fields both routes share; `max_tokens` and `logprobs` as each route reads
  them."""
  stream = _bool(body, "stream", DEFAULTS["stream"])
  opts = body.get("stream_options")
  if opts is not None and (not isinstance(opts, dict) or set(opts) - set(STREAM_OPTIONS)
                           or not all(isinstance(v, bool) for v in opts.values())):
    raise ApiError("stream_options: expected an object of booleans among "
                   f"{', '.join(STREAM_OPTIONS)}", "stream_options")
  opts = opts or {}
  if opts and not stream:
    raise ApiError("stream_options: only allowed with stream=true", "stream_options")
  stop_ids = body.get("stop_token_ids") or []
  if not isinstance(stop_ids, list) or not all(validate.is_int(t) for t in stop_ids):
    raise ApiError("stop_token_ids: expected a list of integers", "stop_token_ids")
  pick = lambda v, key: DEFAULTS[key] if v is None else v
  params = SamplingParams(
      max_tokens=pick(max_tokens, "max_tokens"),
      temperature=pick(_float(body, "temperature"), "temperature"),
      top_k=pick(_int(body, "top_k"), "top_k"), top_p=pick(_float(body, "top_p"), "top_p"),
      seed=_int(body, "seed"), stop_token_ids=tuple(stop_ids), stop=_stop(body),
      ignore_eos=_bool(body, "ignore_eos", False), n=pick(_int(body, "n"), "n"),
      logprobs=logprobs)
  if stream and params.n != 1:
    raise ApiError("n: streaming serves one completion per request (n=1)", "n")
  return Call(None, None, params, stream, bool(opts.get("include_usage")),
              bool(opts.get("continuous_usage_stats")))


def parse_completion(body: Any, names: Union[str, Sequence[str]]) -> Call:
  """A /v1/completions body; raises ApiError naming the first bad field."""
  names = (names,) if isinstance(names, str) else tuple(names)
  body = _check_keys(body, COMPLETION_FIELDS)
  check_model(body, names)
  if "prompt" not in body:
    raise ApiError("prompt: required", "prompt")
  prompt = body["prompt"]
  if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    if len(prompt) != 1:
      raise ApiError(f"prompt: one prompt per request, got {len(prompt)}", "prompt")
    prompt = prompt[0]
  if not isinstance(prompt, (str, list)):
    raise ApiError(f"prompt: expected a string or a list of token ids, got "
                   f"{type(prompt).__name__}", "prompt")
  if isinstance(prompt, list) and not all(validate.is_int(t) for t in prompt):
    raise ApiError("prompt: a token-id prompt must hold integers only", "prompt")
  echo = _bool(body, "echo", False)
  max_tokens = _int(body, "max_tokens")
  # With echo, max_tokens=0 returns the prompt alone (OpenAI's way to score a text;
  # the engine itself never runs a request of 0 tokens).
  if max_tokens == 0 and not echo:
    raise ApiError("max_tokens: 0 is only allowed with echo=true", "max_tokens")
  call = _common(body, max_tokens, _int(body, "logprobs"))
  best_of = _int(body, "best_of")
  if best_of is not None and best_of != call.params.n:
    raise ApiError("best_of: only best_of equal to n is supported", "best_of")
  if echo and call.stream:
    raise ApiError("echo: not supported with stream=true", "echo")
  call.prompt, call.echo = prompt, echo
  return call


def parse_chat(body: Any, names: Union[str, Sequence[str]]) -> Call:
  """A /v1/chat/completions body; raises ApiError naming the first bad field. The
  messages are checked here and rendered by the model's chat template (`api.chat`)."""
  names = (names,) if isinstance(names, str) else tuple(names)
  body = _check_keys(body, CHAT_FIELDS)
  check_model(body, names)
  if "messages" not in body:
    raise ApiError("messages: required", "messages")
  messages = check_messages(body["messages"])
  max_tokens = _int(body, "max_completion_tokens")
  if max_tokens is None:
    max_tokens = _int(body, "max_tokens")
  logprobs = _bool(body, "logprobs", False)
  top = _int(body, "top_logprobs")
  if top is not None and not logprobs:
    raise ApiError("top_logprobs: needs logprobs=true", "top_logprobs")
  call = _common(body, max_tokens, (top or 0) if logprobs else None)
  call.messages, call.max_tokens_given = messages, max_tokens is not None
  call.add_generation_prompt = _bool(body, "add_generation_prompt", True)
  return call


ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(messages: Any) -> List[dict]:
  """Chat messages as {"role", "content": text}: a content list of text parts is
  joined; other part types (images, audio) are refused."""
  if not isinstance(messages, list) or not messages:
    raise ApiError("messages: expected a non-empty list of messages", "messages")
  out = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise ApiError(f"{where}: expected an object with a string role", "messages")
    if m["role"] not in ROLES:
      raise ApiError(f"{where}.role: {m['role']!r} is not one of {', '.join(ROLES)}",
                     "messages")
    content = m.get("content")
    if content is None:
      content = ""
    elif isinstance(content, list):
      texts = []
      for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
            part.get("text"), str):
          kind = part.get("type") if isinstance(part, dict) else type(part).__name__
          raise ApiError(f"{where}.content: only text parts are supported, got {kind!r}",
                         "messages")
        texts.append(part["text"])
      content = "".join(texts)
    elif not isinstance(content, str):
      raise ApiError(f"{where}.content: expected a string or a list of text parts",
                     "messages")
    out.append({"role": m["role"], "content": content})
  return out


def parse_tokenize(body: Any, names: Sequence[str]) -> dict:
  """vLLM's /tokenize body: {"prompt"} or {"messages"}, `add_special_tokens`,
  `add_generation_prompt`, `return_token_strs`."""
  known = ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
           "return_token_strs")
  if not isinstance(body, dict):
    raise ApiError("the body must be a JSON object")
  for key in body:
    if key not in known:
      raise ApiError(f"{key}: unknown field; known: {', '.join(known)}", key)
  check_model(body, names)
  if ("prompt" in body) == ("messages" in body):
    raise ApiError("prompt: give either prompt or messages", "prompt")
  out = {"return_token_strs": _bool(body, "return_token_strs", False)}
  if "prompt" in body:
    if not isinstance(body["prompt"], str):
      raise ApiError("prompt: expected a string", "prompt")
    out.update(prompt=body["prompt"], add_special_tokens=_bool(body, "add_special_tokens",
                                                               True))
  else:
    out.update(messages=check_messages(body["messages"]),
               add_special_tokens=_bool(body, "add_special_tokens", False),
               add_generation_prompt=_bool(body, "add_generation_prompt", True))
  return out


def parse_detokenize(body: Any, names: Sequence[str]) -> List[int]:
  """vLLM's /detokenize body: {"tokens": [ids]}."""
  if not isinstance(body, dict):
    raise ApiError("the body must be a JSON object")
  for key in body:
    if key not in ("model", "tokens"):
      raise ApiError(f"{key}: unknown field; known: model, tokens", key)
  check_model(body, names)
  tokens = body.get("tokens")
  if not isinstance(tokens, list) or not all(validate.is_int(t) for t in tokens):
    raise ApiError("tokens: expected a list of token ids", "tokens")
  return [int(t) for t in tokens]
