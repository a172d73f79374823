"""The tracking layer: every MLflow call (`store`), run lineage (git commit, DVC data hash), the registry
candidate and its champion gate, and the pyfunc model that serves a registered version."""
