"""approxrun's Hydra config tree (installed as the package ``approxrun.conf``).

Importing it puts the schema (approxrun/config/schema.py), the base of ``config.yaml``, into
Hydra's ConfigStore, so every composition of this tree is checked against it.
"""

from approxrun.config.schema import register_configs

register_configs()
