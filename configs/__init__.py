"""The project's configs, shipped with the package as ``moee_jax.configs`` (``--config stage1.py:tiny``
works from any folder): ``get_config(variant)`` files (big_vision style) over ml_collections."""
