"""Deprecated: moved to ``mirai_plugin.tooling.eval`` in 0.2.0 (its modules too);
this path warns and is removed in 0.3.0."""

from typing import TYPE_CHECKING

from mirai_plugin._moved import alias

if TYPE_CHECKING:
    from mirai_plugin.tooling.eval import *

alias(__name__, "mirai_plugin.tooling.eval")
