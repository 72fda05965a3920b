"""CLI commands for this area (registered on tspo.cli_apps)."""
