"""The toy-world demo: ``mirai-plugin demo`` (see docs/demo.md)."""
