"""What every absl app shares: its flags, one-line errors, config checks, list syntax.

`run(main, default_config)` defines `--config` (an ml_collections file),
`--output_json` and `--plots_dir`, parses them and calls `main(cfg, out)`.
`--config` takes a file's path (relative to the current directory) or the name of a
config that ships with the package (`--config=serve_demo`,
`--config=reproduce/distserve_fig1`: `config_file`), either with ml_collections'
`:args` for `get_config(args)`. A bad flag or config value ends the app with one
line on stderr naming it and exit code 1, never a traceback: absl's flag errors,
ml_collections' unknown keys (which it raises as AttributeError from inside flag
parsing), and the ValueError, TypeError and OSError that config checks and the
library raise. Pass `-v 1` for the traceback. Other exceptions are bugs and keep
theirs.

Quiet by default: the apps print their reports, and log at WARNING, not at absl's
INFO, unless `-v`/`--verbosity` is given (`-v 0`: INFO lines, such as orbax's
checkpoint reads and the engine's warm-up; `-v 1`: DEBUG and tracebacks).

Lists take one syntax everywhere: comma-separated values
(`--config.modes=semi_pd,disaggregated`, `--config.rates=1,2,4`); Python tuple
literals work too. Relative paths are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Callable, Optional

from absl import app, flags, logging


class ConfigError(ValueError):
  """A config value the app cannot use; its message names the key."""


# Config keys that were renamed: an old key gets one line naming its new name.
RENAMED = {"max_tokens": "max_step_tokens", "chunk_tokens": "chunked_max_step_tokens",
           "max_prefill_tokens": "max_step_tokens", "token_budget": "max_step_tokens"}


def renamed(path: str) -> Optional[str]:
  """"a.b.max_tokens" -> "a.b.max_step_tokens" when the last part was renamed (not for
  `generation.max_tokens`, an output length, which keeps its name)."""
  *head, last = path.split(".")
  if last in RENAMED and head != ["generation"]:
    return ".".join(head + [RENAMED[last]])
  return None


@dataclasses.dataclass(frozen=True)
class Outputs:
  json: Optional[str]  # where to write the result JSON (None: nowhere)
  plots_dir: Optional[str]  # where to write PNGs (None: no plots)


# The configs that ship with the package. In the repository `pdserve_jax/configs` is a
# link to the top-level `configs/` folder, where they live; a wheel holds them there as
# a folder of their own (setuptools follows the link). So one path serves a checkout,
# an editable install and an installed wheel alike.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
_CONFIG_NAME = re.compile(r"[A-Za-z_]\w*(/[A-Za-z_]\w*)*")


def shipped_configs() -> list[str]:
  """The names of the configs that ship with the package ("serve_demo",
  "reproduce/distserve_fig1", ...)."""
  out = []
  for folder, _, files in os.walk(CONFIGS_DIR):
    rel = os.path.relpath(folder, CONFIGS_DIR)
    out += [os.path.normpath(os.path.join(rel, f[:-3])).replace(os.sep, "/") for f in files
            if f.endswith(".py") and not f.startswith("_")]
  return sorted(out)


def config_file(value: str) -> str:
  """The config file `--config=value` means, its `:args` kept: an existing file as
  given (relative to the current directory), else a shipped config by name
  ("serve_demo" is `CONFIGS_DIR/serve_demo.py`). Raises ConfigError naming what is
  missing: a path that names no file is never looked up among the shipped configs."""
  file, colon, args = value.partition(":")
  if os.path.isfile(file):
    return value
  if _CONFIG_NAME.fullmatch(file):
    path = os.path.join(CONFIGS_DIR, *file.split("/")) + ".py"
    if os.path.isfile(path):
      return path + colon + args
    raise ConfigError(f"no config file {file!r} here and no shipped config of that name "
                      f"(shipped: {', '.join(shipped_configs())})")
  # "configs/serve_demo.py" outside the checkout: say which name would do.
  name = os.path.splitext(file)[0].split("configs/", 1)[-1]
  hint = (f"; the shipped config of that name is --config={name}"
          if name in shipped_configs() else "")
  raise ConfigError(f"no such file {file!r} (relative to {os.getcwd()}){hint}")


def resolve_config_flag(argv: list) -> list:
  """`argv` with the value of `--config` (`--config=x` or `--config x`) made a file's
  path by `config_file`; ends the app with one line when it names none."""
  out = list(argv)
  for i, arg in enumerate(out):
    flag, eq, value = arg.partition("=")
    if flag not in ("--config", "-config"):
      continue
    if not eq and i + 1 < len(out):
      i, value = i + 1, out[i + 1]
    elif not eq:
      continue
    try:
      out[i] = (flag + "=" if eq else "") + config_file(value)
    except ConfigError as e:
      fail(f"--config: {e}")
  return out


def run(main: Callable, default_config: Optional[str] = None,
        plots_dir: Optional[str] = None, output_json: Optional[str] = None) -> None:
  """Runs `main(cfg, Outputs)` as an absl app with these flag defaults; see the
  module docstring. `default_config` is a shipped config's name or a path."""
  from ml_collections import config_flags

  if default_config is not None:
    default_config = config_file(default_config)
  argv = resolve_config_flag(sys.argv)
  try:  # with a default file, ml_collections applies the command line's overrides here
    config_flags.DEFINE_config_file("config", default_config, "experiment config file",
                                    sys_argv=argv)
  except (AttributeError, KeyError, TypeError) as e:
    fail(_unknown_key(e, argv, default_config))
  flags.DEFINE_string("output_json", output_json, "write the result JSON here")
  flags.DEFINE_string("plots_dir", plots_dir, "write PNG plots into this folder")
  flags.DEFINE_string("compilation_cache", default_cache_dir(),
                      "JAX's persistent compilation cache folder, so a second run skips "
                      "compiling ('' turns it off)")
  # sys.argv keeps what was typed (the result file records it); flags parse `argv`.
  app.run(lambda rest: _guarded(main, rest),
          flags_parser=lambda typed: _parse(resolve_config_flag(typed), default_config))


def default_cache_dir() -> str:
  """`$JAX_COMPILATION_CACHE_DIR` when set, else `$XDG_CACHE_HOME/pdserve_jax/jax`
  (~/.cache by default)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "pdserve_jax", "jax")


def use_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" leaves it off).

  Every program is cached, however fast it compiled: an engine compiles dozens of
  small ones, and together they are its warm-up.
  """
  if not path:
    return
  path = os.path.abspath(path)
  settings = {"jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  if "jax" in sys.modules:
    import jax

    for k, v in settings.items():
      jax.config.update(k, v)
  else:  # jax reads these when it is imported; the simulator-only apps never import it
    for k, v in settings.items():
      os.environ[k.upper()] = str(v)


def fail(message: str) -> None:
  """Ends the app: one line on stderr, exit code 1."""
  prog = os.path.basename(sys.argv[0]).removesuffix(".py")
  if prog in ("__main__", "-m", "-c", ""):
    prog = "pdserve_jax"
  one_line = " ".join(str(message).split())
  sys.stderr.write(f"{prog}: error: {one_line}\n")
  sys.stderr.flush()
  sys.exit(1)


def _parse(argv, default_config):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError) as e:  # ml_collections: an unknown key
    fail(_unknown_key(e, argv, default_config))
  except flags.Error as e:
    fail(_flag_error(str(e)))
  except (ValueError, OSError, SyntaxError) as e:  # a config file failing to load
    fail(f"--config: {e}")


def _unknown_key(e: Exception, argv, default_config: Optional[str]) -> str:
  text = e
  while isinstance(text, BaseException):  # AttributeError(KeyError("'key'\nDid you mean..."))
    text = text.args[0] if text.args else str(text)
  hint = re.search(r'Did you mean "([^"]+)"', str(text))
  path = _unknown_path(argv, default_config)
  if path is None and isinstance(e, TypeError):  # not an override: the file itself
    return f"--config: {e}"
  if path is None:  # the file would not load on its own: name what the error names
    found = re.findall(r"'([^']+)'", str(text))
    path = found[0] if found else str(text)
  new = renamed(path)
  if new is not None:
    return f"config key {path} was renamed {new}"
  return f"unknown config key {path}" + (f" (did you mean {hint.group(1)}?)" if hint else "")


def _unknown_path(argv, default_config: Optional[str]) -> Optional[str]:
  """The first `--config.a.b` override naming no key of the config file, as "a.b"
  (ml_collections' own error names only the last part); None if unknown."""
  import importlib.util

  import ml_collections

  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
               default_config)
  try:
    file, colon, args = value.partition(":")
    spec = importlib.util.spec_from_file_location("_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(*([args] if colon else []))
  except Exception:  # noqa: BLE001 - any failure here just means "cannot tell"
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    parts = arg.split("=", 1)[0].removeprefix("--config.").split(".")
    node = cfg
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return ".".join(parts[:i + 1])
      node = node[part]
  return None


def _config_file_error(text: str) -> str:
  # ml_collections lists the paths it tried over several lines; the errno line says it.
  tried = re.findall(r"\[Errno \d+\] ([^\n]+)", text)
  return f"--config: {tried[0] if tried else text}"


def _flag_error(text: str) -> str:
  if "Attempted" in text and "--config." not in text:
    return _config_file_error(text)
  if "Traceback" in text:  # a config file that raised: its last line says why
    return f"--config: {text.strip().splitlines()[-1]}"
  m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", text, re.S)
  if m:
    return f"config key {m.group(1)}: bad value {m.group(2)!r} ({m.group(3).strip()})"
  return text


def _guarded(main: Callable, argv) -> None:
  if not flags.FLAGS["verbosity"].present:  # absl raised it to INFO after parsing
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected argument(s): {' '.join(argv[1:])}")
  try:
    cfg = flags.FLAGS.config
    if cfg is not None:
      cfg.keys()  # a file that failed to load raises on first use
  except Exception as e:  # noqa: BLE001 - a config file that failed to load, any way
    fail(_config_file_error(str(e)))
  if cfg is None:
    fail("--config is required")
  out = Outputs(flags.FLAGS.output_json or None, flags.FLAGS.plots_dir or None)
  use_compilation_cache(flags.FLAGS.compilation_cache)
  try:
    main(cfg, out)
  except AttributeError as e:
    if flags.FLAGS.verbosity >= 1 or not (e.args and isinstance(e.args[0], KeyError)):
      raise  # not ml_collections' missing key: a bug
    key = re.findall(r"'([^']+)'", str(e.args[0].args[0]))
    fail(f"config key {key[0] if key else e} is missing from the config file")
  except (ValueError, TypeError, KeyError, OSError, app.UsageError) as e:
    if flags.FLAGS.verbosity >= 1:
      raise
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in text:
      text = f"{text}: {e.filename}"
    fail(text or type(e).__name__)


# --- config values ------------------------------------------------------------------


def names(key: str, value) -> tuple[str, ...]:
  """A list of names from a config value: "a,b", ("a,b",) or ("a", "b")."""
  items = [value] if isinstance(value, str) else list(value)
  out = []
  for item in items:
    if not isinstance(item, str):
      raise ConfigError(f"{key}: expected names, got {item!r}")
    out += [s.strip(" ()'\"") for s in item.split(",")]
  out = tuple(s for s in out if s)
  if not out:
    raise ConfigError(f"{key}: the list is empty")
  return out


def numbers(key: str, value, kind=float, low: float = 0.0, strict: bool = True) -> tuple:
  """A list of numbers of `kind` from a config value (a tuple, or one number), each
  above `low` (or at least `low` when not `strict`)."""
  items = value if isinstance(value, (tuple, list)) else (value,)
  out = []
  for item in items:
    try:
      if isinstance(item, bool) or (kind is int and float(item) != int(float(item))):
        raise ValueError
      v = kind(float(item)) if isinstance(item, str) else kind(item)
    except (TypeError, ValueError):
      raise ConfigError(f"{key}: expected {kind.__name__}s, got {item!r}") from None
    if not math.isfinite(v) or (v <= low if strict else v < low):
      raise ConfigError(f"{key}: each value must be {'>' if strict else '>='} {low:g}, "
                        f"got {item!r}")
    out.append(v)
  if not out:
    raise ConfigError(f"{key}: the list is empty")
  return tuple(out)


def check(cfg, rules: dict) -> None:
  """Checks each dotted key of `rules` present in `cfg` with its rule, a function
  of the value returning an error (str) or None."""
  for key, rule in rules.items():
    node, parts = cfg, key.split(".")
    for p in parts[:-1]:
      node = node.get(p) if hasattr(node, "get") else None
    if node is None or parts[-1] not in node:
      continue
    value = node[parts[-1]]
    problem = rule(value)
    if problem:
      raise ConfigError(f"{key}: {problem}, got {value!r}")


def at_least(low):
  return lambda v: None if v >= low else f"must be >= {low}"


def positive(v):
  return None if v > 0 and math.isfinite(v) else "must be > 0"


def fraction(v):
  return None if 0 < v <= 1 else "must lie in (0, 1]"


def open_fraction(v):
  return None if 0 < v < 1 else "must lie strictly between 0 and 1"


def one_of(*known):
  return lambda v: None if v in known else f"must be one of {', '.join(known)}"


# Keys several apps share, checked wherever a config has them.
RULES = {
    "ttft_slo": positive, "tpot_slo": positive, "memory_utilization": fraction,
    "page_size": at_least(1), "init_std": positive, "seed": at_least(0),
}


def config_dict(cfg) -> dict:
  """The config as plain JSON values (tuples become lists)."""
  def plain(v):
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    return v
  return plain(cfg.to_dict())


def save(app_name: str, cfg, out: Outputs, runs, plots, start: float, **extra) -> None:
  """Writes the app's result file (`pdserve_jax.results`) when --output_json is set;
  `start` is the app's `time.perf_counter()` at the beginning."""
  from pdserve_jax import results

  if out.json:
    results.write(out.json, results.document(
        app_name, config_dict(cfg), runs, plots,
        wall_seconds=time.perf_counter() - start, **extra))


def progress(total: Optional[int], desc: str, unit: str = "it"):
  """A tqdm bar on stderr, drawn only when stderr is a terminal."""
  from tqdm import tqdm

  return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False,
              dynamic_ncols=True)


def table(runs) -> str:
  """One row per result run: devices, TTFT and TPOT P50/P90, attainment, throughput,
  preemptions, and the share of prefill tokens a prefix cache served."""
  ms = lambda v: f"{v * 1e3:9.1f}" if v is not None else "        -"
  num = lambda v, f: format(v, f) if v is not None else "-"
  rows = [f"{'mode':<24} {'run':>10} {'devs':>4} {'TTFT p50':>9} {'TTFT p90':>9} "
          f"{'TPOT p50':>9} {'TPOT p90':>9} {'attain':>7} {'req/s':>7} {'tok/s':>8} "
          f"{'preempt':>7} {'hit':>5}   (times in ms)"]
  for r in runs:
    s, rate = r["summary"], r["rate_rps"]
    what = ("sim" if r["executor"] == "simulator" else "engine") + (
        "" if rate is None else f"@{rate:g}")
    rows.append(f"{r['mode']:<24} {what:>10} {r['num_devices']:>4} {ms(s['ttft_s']['p50'])} "
                f"{ms(s['ttft_s']['p90'])} {ms(s['tpot_s']['p50'])} {ms(s['tpot_s']['p90'])} "
                f"{s['attainment']:>7.0%} {num(s.get('throughput_rps'), '>7.2f')} "
                f"{num(s.get('output_tokens_per_s'), '>8.1f')} {r['preemptions']:>7d} "
                f"{num(s.get('prefix_hit_rate'), '>5.0%')}")
  return "\n".join(rows)
