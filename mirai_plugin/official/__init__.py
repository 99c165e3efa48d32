"""The official Video-Mirai formats: its trainer's config keys (``trainer_config``) and the
projector weights its trainer saves (``projector``)."""
