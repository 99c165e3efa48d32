"""Deprecated: moved to ``mirai_plugin.tooling.probe`` in 0.2.0; this path warns and is removed in 0.3.0."""

from typing import TYPE_CHECKING

from mirai_plugin._moved import alias

if TYPE_CHECKING:
    from mirai_plugin.tooling.probe import *

alias(__name__, "mirai_plugin.tooling.probe")
