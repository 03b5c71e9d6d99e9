"""Reading config files: the presets shipped in the package and YAML files by path, with
syntax errors and non-mappings reported as ConfigErrors naming the file and line; and the
dotted ``key=value`` overrides laid over them."""
from __future__ import annotations

import datetime
import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Sequence

import yaml

from glsd.config_types import OverrideText
from glsd.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, with YAML 1.2's floats: ``1e-5`` is a number (1.1 wants
    ``1.0e-5`` and reads ``1e-5`` as a string, which timm then refuses in backbone_kwargs),
    and, as YAML 1.2 says, no key twice in one mapping (PyYAML keeps the last: a second
    ``train:`` section would silently drop the first's keys)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the keys as written (a << merge may repeat them)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} given twice in one mapping: merge them",
                    key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Quotes the strings :class:`_Loader` would read as numbers (a split named ``1e5``)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                               list("-+0123456789"))


class ConfigShapeError(yaml.YAMLError):
    """A document that parses but cannot be a config: too big once its aliases are expanded,
    containing itself, or beyond Python's limits (nesting, integer digits)."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


MAX_CONFIG_VALUES = 100_000  # a config holds a few hundred values


def load_yaml(text: str):
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (ValueError, RecursionError, OverflowError) as e:  # deep brackets, 5,000-digit ints
        raise ConfigShapeError(f"{type(e).__name__}: {str(e)[:200]}") from None
    check_shape(data)
    return data


def check_shape(data) -> None:
    """Refuse a structure of more than MAX_CONFIG_VALUES values, counting each appearance of a
    shared one (YAML aliases, a pickle's shared objects: a few bytes that expand to billions
    for whoever walks them), or one that contains itself. One walk, linear in what it counts."""
    count, inside, stack = 0, set(), [(False, data)]
    while stack:
        leaving, item = stack.pop()
        if leaving:  # every child of ``item`` is done
            inside.discard(id(item))
            continue
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigShapeError(f"it expands to more than {MAX_CONFIG_VALUES:,} values (aliases of "
                                   "anchors?); a config holds a few hundred")
        if isinstance(item, (list, tuple, dict)):
            if id(item) in inside:
                raise ConfigShapeError("a value contains itself (an alias inside its own anchor)")
            inside.add(id(item))
            stack.append((True, item))
            stack.extend((False, child) for child in (item.values() if isinstance(item, dict) else item))


def dump_yaml_text(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def preset_names() -> list[str]:
    files = resources.files("glsd").joinpath("presets").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def read_yaml(name_or_path: str) -> tuple[dict, str]:
    """(raw mapping, name) of a preset or a YAML file. A file that names a shipped preset in
    its ``preset:`` key starts from that preset (its keys win, section by section)."""
    path = Path(name_or_path)
    # A file, or a name with a YAML suffix; a folder named like a preset (a run's output_dir,
    # a study's --out) is not a config: the preset is meant.
    if path.suffix in (".yaml", ".yml") or path.is_file() or (path.exists() and name_or_path not in preset_names()):
        if not path.is_file():
            preset = f" (the shipped preset is named {path.stem}, without {path.suffix})" \
                if path.stem in preset_names() and not path.exists() else ""
            raise ConfigError(f"config file {path} does not exist{preset}" if not path.exists() else
                              f"{path} is a folder, not a config file; give a YAML file or a preset "
                              f"({', '.join(preset_names())})")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the config file {path}: {getattr(e, 'strerror', None) or e}") from None
        raw = parse_yaml(text, str(path))
        base = raw.get("preset")
        if isinstance(base, str) and base.endswith((".yaml", ".yml")) and not _is_record(raw):
            raise ConfigError(f"{path}: preset: {base} names a file; a config file starts from a "
                              f"shipped preset only ({', '.join(preset_names())}): name one, or copy "
                              f"the keys of {base} into {path.name}")
        if isinstance(base, str) and base and not base.endswith((".yaml", ".yml")):
            if base not in preset_names():
                close = difflib.get_close_matches(base, preset_names(), n=3)
                raise ConfigError(f"{path}: preset: {base!r} is not a shipped preset"
                                  f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                                  f"presets: {', '.join(preset_names())}")
            raw = on_top_of(read_yaml(base)[0], raw)
        return raw, str(path)
    res = resources.files("glsd").joinpath(f"presets/{name_or_path}.yaml")
    if not res.is_file():
        if "=" in name_or_path:  # glsd pretrain data.root=...: the preset was left out
            raise ConfigError(f"'{name_or_path}' is an override, where the preset (or a YAML "
                              f"file) comes first, then the overrides: e.g. cpu-default "
                              f"{name_or_path}. Presets: {', '.join(preset_names())}")
        close = difflib.get_close_matches(name_or_path, preset_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset '{name_or_path}'.{hint} "
                          f"Presets: {', '.join(preset_names())}; or give a path to a YAML file.")
    return parse_yaml(res.read_text(), f"preset {name_or_path}"), name_or_path


def _is_record(raw: dict) -> bool:
    """A run's config.yaml (every section written out, its ``preset:`` the file it came from),
    not a hand-written file on top of another."""
    return {"data", "crops", "model", "loss", "train", "eval"} <= set(raw)


def parse_yaml(text: str, name: str) -> dict:
    """A YAML config mapping; syntax errors and non-mappings are ConfigErrors naming the line."""
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{name}:{where}: YAML syntax error ({problem}); fix the file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} holds a {type(raw).__name__}, not a mapping of config sections "
                          "(e.g. 'train:' then '  epochs: 5')")
    return raw


def on_top_of(base: dict, top: dict) -> dict:
    """``top``'s keys over ``base``'s, section by section; a value inside a section (a list,
    or a mapping such as model.backbone_kwargs) replaces the base's whole."""
    out = dict(base)
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            out[section] = {**base[section], **values}
        else:
            out[section] = values
    return out


# ----------------------------------------------------------------------------------------
# Dotted key=value overrides

def parse_overrides(overrides: Sequence[str]) -> dict:
    """``a.b=1`` -> {"a": {"b": 1}}; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for depth, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' goes inside "
                                  f"'{'.'.join(parts[:depth + 1])}', which an earlier override "
                                  "set to a single value; give that key once")
        try:
            parsed = load_yaml(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or e}); quote it or fix brackets") from None
        if isinstance(parsed, (bool, int, float, datetime.date)):  # the text too, for str keys
            parsed = OverrideText(value.strip(), parsed)
        elif ((isinstance(parsed, str) or parsed is None) and (" #" in value or value.strip().startswith("#"))
              and not value.strip().startswith(("'", '"'))):
            parsed = value.strip()  # a command line has no comments: output_dir=runs/exp #2 is that name
        # A mapping literal for a key (model.backbone_kwargs={...}) replaces it; one for a whole
        # section (train={epochs: 1}) merges into it key by key, as a YAML file's section does.
        if isinstance(parsed, dict):
            parsed = (_Replace(parsed) if len(parts) > 1 else
                      {k: _Replace(v) if isinstance(v, dict) else v for k, v in parsed.items()})
        node[parts[-1]] = parsed
    return out


class _Replace(dict):
    """A mapping given whole on the command line: replaces the preset's, never merges."""


def merge_overrides(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, _Replace):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_overrides(out[k], v)
        else:
            out[k] = v
    return out
