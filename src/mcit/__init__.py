"""mcit: multimodal continual instruction tuning."""

__version__ = "0.1.0"
