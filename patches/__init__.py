"""Patch files shipped with mirai_plugin (read with importlib.resources); see README.md here."""
