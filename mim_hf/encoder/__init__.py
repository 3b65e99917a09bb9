"""The content encoder around ``MIMContentEncoder``: building it from a config, LoRA, batch encoding."""
