"""Glue between mirai_plugin and upstream trainers; the patch files call into these modules."""
