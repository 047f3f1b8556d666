"""Where the default templates live (package data: controller/templates/*)."""

from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
