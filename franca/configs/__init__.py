"""Shipped configuration files: ``ssl_default_config.yaml`` holds every training key and its default."""
