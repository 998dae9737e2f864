"""Command-line entry points and scheduled-job examples for qa-batch."""
