"""Built-in search spaces (YAML), shipped inside the package as ``catdog_hpo.search_spaces``."""
