"""Model and dataset card templates (``string.Template`` markdown), installed as
``mim_hf.card_templates`` so a pip-installed package finds them too."""
