"""Training configs and the default search space, as YAML: shipped with the package so installed `spai` finds them."""
