"""Chat messages to a prompt: the model's chat template (its `tokenizer_config.json`'s
`chat_template`, a Jinja2 string) rendered as Hugging Face renders it.

The template runs in Jinja2's immutable sandbox with HF's conventions: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, trimmed blocks.
The rendered text is tokenised without the tokenizer's own special tokens (the
template writes its BOS), as vLLM and HF's `apply_chat_template` do. A model with no
chat template cannot serve the chat route: the route says so (400) instead of
guessing a format. Limits: no tools, no multimodal parts (`api.protocol` refuses them).
"""

from __future__ import annotations

import functools
from typing import List

from pdserve_jax.api.protocol import ApiError


@functools.lru_cache(maxsize=4)
def _compile(template: str):
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise ApiError(f"the model's chat template does not compile: {e}", None, 500,
                   "server_error") from None


def render(tokenizer, messages: List[dict], add_generation_prompt: bool = True) -> str:
  """The prompt text of `messages` by `tokenizer.chat_template`."""
  import jinja2

  template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
  if not template:
    raise ApiError("messages: this model has no chat template (tokenizer_config.json "
                   "chat_template); use /v1/completions", "messages")
  try:
    return _compile(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
  except jinja2.TemplateError as e:
    raise ApiError(f"messages: the chat template refused them: {e}", "messages") from None


def prompt_ids(tokenizer, messages: List[dict], add_generation_prompt: bool = True,
               add_special_tokens: bool = False) -> List[int]:
  """The token ids the engine serves for `messages`."""
  return tokenizer.encode(render(tokenizer, messages, add_generation_prompt),
                          add_special_tokens=add_special_tokens)
