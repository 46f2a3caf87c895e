"""The ``experiment`` config group, read from the top-level ``experiments/`` directory.

A Hydra search path entry ``convnn-experiments://<dir>`` (added by :class:`ExperimentsSearchPath`
to ``convnn-train``'s search path) shows ``<dir>/*.yaml`` and ``<dir>/paper/*.yaml`` as the group
``experiment`` (``experiment=quickstart``, ``experiment=paper/table1``). It replaces a
``configs/experiment`` symlink, which a wheel cannot carry.
"""

import os
from typing import List, Optional  # noqa: UP035 - Hydra's plugin interface

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

import convnn.train.config  # noqa: F401 - registers train_schema, the base of configs/train.yaml

GROUP = "experiment"
SCHEME = "convnn-experiments"


class ExperimentsConfigSource(ConfigSource):
    """``convnn-experiments://<dir>``: the files of ``<dir>`` as the config group ``experiment``."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _real(self, config_path: str) -> Optional[str]:  # noqa: UP045
        """The file system path of ``config_path`` (``experiment/paper/table1.yaml``), or ``None``
        for paths outside the group."""
        parts = config_path.strip("/").split("/", 1)
        if parts[0] != GROUP:
            return None
        return os.path.join(self.path, parts[1]) if len(parts) == 2 else self.path

    def load_config(self, config_path: str) -> ConfigResult:
        real = self._real(self._normalize_file_name(config_path))
        if real is None or not os.path.isfile(real):
            raise ConfigLoadError(f"Config not found : {config_path}")
        with open(real, encoding="utf-8") as f:
            header = ConfigSource._get_header_dict(f.read(512))
            f.seek(0)
            cfg = OmegaConf.load(f)
        return ConfigResult(config=cfg, path=f"{SCHEME}://{self.path}", provider=self.provider, header=header)

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return True
        real = self._real(config_path)
        return real is not None and os.path.isdir(real)

    def is_config(self, config_path: str) -> bool:
        real = self._real(self._normalize_file_name(config_path))
        return real is not None and os.path.isfile(real)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:  # noqa: UP006, UP045
        if config_path.strip("/") == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        real = self._real(config_path)
        files: List[str] = []  # noqa: UP006
        for name in os.listdir(real) if real and os.path.isdir(real) else []:
            self._list_add_result(files, os.path.join(config_path, name), name, results_filter)
        return sorted(set(files))


class ExperimentsSearchPath(SearchPathPlugin):
    """Adds ``convnn-experiments://<experiments dir>`` to the search path of ``convnn-train``
    (any app whose config directory is ``convnn.paths.CONFIG_DIR``)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from convnn.paths import CONFIG_DIR, EXPERIMENTS_DIR

        ours = any(str(e.path).rstrip("/").endswith(str(CONFIG_DIR)) for e in search_path.get_path())
        if ours:
            search_path.append(provider="convnn", path=f"{SCHEME}://{EXPERIMENTS_DIR}")
