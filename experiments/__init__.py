"""The shipped experiment configs (YAML data; provq-fit --config NAME finds them here)."""
