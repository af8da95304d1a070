"""`Tokenizer`: text to token ids and back, from a Hugging Face `tokenizer.json`.

One path for every model: a local HF folder's `tokenizer.json` read by the
`tokenizers` library, with the end-of-sequence ids from `generation_config.json`,
`config.json` or `tokenizer_config.json` (the first that names them). The demo
model's byte-level tokenizer (`byte_tokenizer`) is built with the same library and
saved as a `tokenizer.json`, so `transformers` can read it too.

The folder's chat template (`tokenizer_config.json`'s `chat_template`, a Jinja2
string) is kept as `chat_template`; the HTTP front end renders it (`api.chat`).

Limits: decoding is whole-sequence (`decode(ids)`); callers that stream text decode
the ids so far and emit the new suffix.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

TOKENIZER_FILE = "tokenizer.json"
# The byte tokenizer: ids 0..255 are the bytes, then these special tokens.
BYTE_SPECIALS = ("<s>", "</s>")
# The byte tokenizer's chat template: "Role: content" lines, then "Assistant:" (a
# plain-text dialogue the demo model, trained on prose, can continue).
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'] }}\n\n{% else %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


class Tokenizer:
  """Encodes text to ids and decodes ids to text; knows the model's EOS ids."""

  def __init__(self, tk, eos_token_ids: Sequence[int] = (), chat_template: Optional[str] = None,
               bos_token: Optional[str] = None):
    self._tk = tk
    self.eos_token_ids: Tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
    self.chat_template, self.bos_token = chat_template, bos_token

  @property
  def eos_token(self) -> Optional[str]:
    return self._tk.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
    """Ids of `text`, with the special tokens the tokenizer's template adds (BOS)
    unless `add_special_tokens` is False (a rendered chat template writes its own)."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens left out."""
    return self._tk.decode(list(ids), skip_special_tokens=True)

  def save(self, path: str) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` (the EOS and BOS tokens,
    the chat template)."""
    os.makedirs(path, exist_ok=True)
    self._tk.save(os.path.join(path, TOKENIZER_FILE))
    config = {"eos_token": self.eos_token}
    if self.bos_token is not None:
      config["bos_token"] = self.bos_token
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=1)


def byte_tokenizer() -> Tokenizer:
  """Bytes 0..255 as ids 0..255, then `<s>` (256, prepended) and `</s>` (257, EOS)."""
  from tokenizers import Tokenizer as _Tk, decoders, models, pre_tokenizers, processors
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  # ByteLevel maps byte b to a printable character; order the vocabulary by byte value.
  byte_to_char = _byte_level_chars()
  assert sorted(byte_to_char.values()) == sorted(alphabet)
  vocab = {byte_to_char[b]: b for b in range(256)}
  tk = _Tk(models.BPE(vocab=vocab, merges=[]))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens(list(BYTE_SPECIALS))
  bos, eos = 256, 257
  tk.post_processor = processors.TemplateProcessing(
      single=f"{BYTE_SPECIALS[0]} $A", special_tokens=[(BYTE_SPECIALS[0], bos)])
  return Tokenizer(tk, eos_token_ids=(eos,), chat_template=BYTE_CHAT_TEMPLATE,
                   bos_token=BYTE_SPECIALS[0])


def _byte_level_chars() -> dict:
  """GPT-2's byte-to-unicode table, which `tokenizers`' ByteLevel uses."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def eos_ids_of(path: str, tk=None) -> Tuple[int, ...]:
  """EOS ids named in folder `path`'s generation_config.json, config.json or (with the
  tokenizer `tk`) tokenizer_config.json; () when none names them."""
  for name in ("generation_config.json", "config.json"):
    file = os.path.join(path, name)
    if os.path.isfile(file):
      with open(file) as f:
        eos = json.load(f).get("eos_token_id")
      if eos is not None:
        return tuple(eos) if isinstance(eos, list) else (int(eos),)
  file = os.path.join(path, "tokenizer_config.json")
  if tk is not None and os.path.isfile(file):
    with open(file) as f:
      tok = json.load(f).get("eos_token")
    if isinstance(tok, dict):
      tok = tok.get("content")
    if tok is not None and tk.token_to_id(tok) is not None:
      return (tk.token_to_id(tok),)
  return ()


def load_tokenizer(path: str) -> Optional[Tokenizer]:
  """The tokenizer of the HF-style folder `path`, or None when it has no tokenizer.json."""
  file = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(file):
    return None
  from tokenizers import Tokenizer as _Tk
  tk = _Tk.from_file(file)
  config = {}
  if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
    with open(os.path.join(path, "tokenizer_config.json")) as f:
      config = json.load(f)
  template, bos = config.get("chat_template"), config.get("bos_token")
  if isinstance(template, list):  # HF's named templates: the default one
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  return Tokenizer(tk, eos_ids_of(path, tk), template,
                   bos.get("content") if isinstance(bos, dict) else bos)
