"""The cluster config of a Ray render (`render --ray ADDRESS --ray-config cluster.yaml`): where
each node keeps the files that the recipes name (models, VAEs, LoRAs, embeddings, upscalers).

    # cluster.yaml
    models:                  # on every other node: a path prefix on the driver -> the node's prefix
      /home/anna/sd: /srv/sd
    nodes:                   # a node (by its hostname) whose paths differ from `models`
      gpu-2:
        models:
          /home/anna/sd: /data/sd
      workstation: {}        # the driver's paths, as they are

Without a config every node uses the driver's paths; so does the driver's own machine unless
`nodes` names it. A mapping replaces the longest matching prefix, whole path components only:
with `/home/anna/sd: /srv/sd`, `/home/anna/sd/loras/x.safetensors` is read from
`/srv/sd/loras/x.safetensors` on the node, and `/home/anna/sdxl` is left alone. Whatever the
path, the node's file must have the driver's sha256 (`imagegen.render.ray_actor` checks).
torch-free and ray-free.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from imagegen.errors import InputError

KEYS = ("models", "nodes")  # top-level keys of a cluster config
NODE_KEYS = ("models",)  # keys of one entry under `nodes`


@dataclass(frozen=True)
class ClusterConfig:
    """Path mappings: `models` for every node but the driver's, `nodes` per hostname."""

    models: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    path: str | None = None  # the file it was read from

    def mapping_for(self, host: str, driver_host: str) -> dict[str, str]:
        """The prefix mapping of the node named `host` (the driver runs on `driver_host`)."""
        if host in self.nodes:
            return self.nodes[host]
        return {} if host == driver_host else self.models


def map_path(path: str, mapping: dict[str, str]) -> str:
    """`path` on a node with `mapping` (driver prefix -> node prefix; the longest whole-component
    match wins). Names that are not absolute paths (builtin:..., hub ids) stay as they are."""
    if not mapping or not path.startswith("/"):
        return path
    best = max((p for p in mapping if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
    if best is None:
        return path
    rest = path[len(best.rstrip("/")):].lstrip("/")
    return posixpath.join(mapping[best], rest) if rest else mapping[best]


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read a cluster config file. Raises InputError naming the file and the key for a missing or
    unreadable file, an unknown key, or a mapping that is not absolute path -> absolute path."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: cluster config not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the cluster config: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise InputError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a cluster config is a mapping with the keys {', '.join(KEYS)}")
    _unknown(path, data, KEYS, "")
    models = _mapping(path, data.get("models"), "models")
    nodes_in = data.get("nodes") or {}
    if not isinstance(nodes_in, dict):
        raise InputError(f"{path}: `nodes` maps hostnames to {{models: ...}}, got {type(nodes_in).__name__}")
    nodes: dict[str, dict[str, str]] = {}
    for host, entry in nodes_in.items():
        entry = entry or {}
        if not isinstance(entry, dict):
            raise InputError(f"{path}: `nodes.{host}` takes `models:`, got {entry!r}")
        _unknown(path, entry, NODE_KEYS, f"nodes.{host}.")
        nodes[str(host)] = _mapping(path, entry.get("models"), f"nodes.{host}.models")
    return ClusterConfig(models, nodes, str(path))


def _unknown(path: Path, data: dict, allowed: tuple[str, ...], where: str) -> None:
    import difflib

    for key in data:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean `{where}{near[0]}`?" if near else f" (allowed: {', '.join(allowed)})"
            raise InputError(f"{path}: unknown key `{where}{key}`{hint}")


def _mapping(path: Path, value: object, key: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{path}: `{key}` maps a path on the driver to the path on the node, got {value!r}")
    out: dict[str, str] = {}
    for src, dst in value.items():
        for side in (src, dst):
            if not isinstance(side, str) or not side.startswith("/"):
                raise InputError(f"{path}: `{key}`: {side!r} is not an absolute path (write `/driver/path: /node/path`)")
        out[posixpath.normpath(src)] = posixpath.normpath(dst)
    return out
